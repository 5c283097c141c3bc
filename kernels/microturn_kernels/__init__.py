"""microturn_kernels: Triton kernels for micro-turn serving.

Needs only torch and triton, never SGLang, so a trainer can import the same kernels the server runs.
Every kernel has a plain-PyTorch reference beside it and states its precision contract.
"""
