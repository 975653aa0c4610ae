"""What a forward pass is: loading a model (models), its weight formats (quant), our own Llama forward
(llama_forward) with its CPU kernels (kernels, attention, csrc/), and the KV cache and plain decoding (decoding).
Imports no other wing."""
