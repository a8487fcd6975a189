"""What a training run does to its directory (`train.output_dir`), one module a job:

- `run_dir`: the directory's files and mark (`run.json`), the decision to start, resume or replace a run there;
- `lock`: one training process per directory;
- `startup`: how the processes of a run agree on that decision and on one shared directory;
- `resume`: which config fields a resumed run may change, the data files' fingerprint;
- `checkpoint`: the run's checkpoints (orbax), owned and checksummed;
- `divergence`: when a diverging run stops, so that its last checkpoint is worth resuming from;
- `stop`: stopping on SIGTERM or SIGINT after the current step, with a checkpoint;
- `export`: a run's checkpoint -> a PEFT adapter directory (`qlora-jax export`).

These modules import train's step modules (`config`, `data`, `optim`, `step`, `build`), never the other way
round; the driver (`qlora_jax.train.loop`) uses both (tests/test_layering.py checks it).
"""
