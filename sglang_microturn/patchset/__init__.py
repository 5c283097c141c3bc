"""Our patches to SGLang (`patches/*.patch`, shipped as package data) and the machinery that applies them."""
