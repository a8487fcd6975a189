"""Many devices: the `data` x `fsdp` mesh and the model traced for JAX's context mesh (`mesh`), arrays put on their
shardings and batches assembled from each process's rows (`placement`), the multi-host start (`distributed`).

Each module is imported by its own name (`from qlora_jax.parallel.mesh import make_mesh`); this package imports
none of them. The sharding rule (`qlora_jax.sharding`) is not here: it reads where a model's stacked layers are
(`qlora_jax.models.names`), so it stands above the models, while the models import this package's mesh.
"""
