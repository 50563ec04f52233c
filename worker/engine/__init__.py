"""A PyTorch inference engine for the Llama family (Llama 2/3/3.1, Mistral, Qwen2)."""
