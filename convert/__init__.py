"""Convert an SD3 / SD3.5 diffusers pipeline to a verified FP8 variant and publish it."""
