"""The bottom layer: contracts and math every other layer uses (parameter kinds and the adapter context,
low-rank products, losses, dropout, sharding rules). Imports nothing else of ept_jax."""
