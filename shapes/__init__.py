"""A tiny SD3 model that draws coloured shapes from captions: data, detector, model and training."""
