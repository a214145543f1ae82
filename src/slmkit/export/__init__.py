"""Export: store models to GGUF (with llama.cpp's quant types) and an Ollama Modelfile."""
