"""Models on disk: the model store, import (GGUF, Hugging Face directories, random weights) and the parameter
service that streams each worker its tensors."""
