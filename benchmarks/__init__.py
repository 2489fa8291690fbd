"""Speed and memory of ept_jax against the physical limit and the PyTorch + PEFT peer.

``python -m benchmarks.run [--quick] [--out benchmarks/results/<machine>.json]`` runs every row in one process
(``benchmarks.run``); ``python -m benchmarks.table results.json`` prints the Markdown table for the README.
Modules: ``measure`` (timing, memory, machine, MFU), ``setups`` (models, configs, batches), ``jax_rows`` (the
limit, the ept_jax training steps, generation), ``torch_peer`` (transformers + PEFT LoRA).
"""
