"""The Gradio UI, the Space card and the deploy command for Hugging Face Spaces."""
