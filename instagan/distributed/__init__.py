"""Everything that runs on Ray, and the only part of instagan that imports it (importing this package alone does
not): `train` (the Ray Train worker: RayHost around instagan.loop, datasets), `launch` (config, Ray init, the
TorchTrainer; jobs/train.py), `sweep` (Ray Tune; jobs/tune.py)."""
