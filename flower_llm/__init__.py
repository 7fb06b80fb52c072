"""flower-llm: federated QLoRA fine-tuning of causal LLMs on Flower.

The library knows nothing about Flower apps: ``client_apps/`` and ``server_apps/`` are
thin layers over it.
"""

__version__ = "0.1.0"
