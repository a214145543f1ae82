"""Where models come from: GGUF files, Hugging Face folders, and the model packaged with slmkit."""
