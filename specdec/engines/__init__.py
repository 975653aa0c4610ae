"""The peers measured beside our engine: transformers' own generate and assisted generation (hf_reference) and
llama.cpp (llamacpp). Imports only the model and methods wings below it."""
