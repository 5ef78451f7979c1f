"""The model families the training engine trains, one file each (`pipeline.training.task.Task`):
`tokenizer` (VAE and VQ families), `adversarial` (VQGAN: + LPIPS and a discriminator) and
`prior` (a Transformer over a token store). The image tasks share `image_data` (shards, streams)
and `image_validation` (metrics, panels).
"""
