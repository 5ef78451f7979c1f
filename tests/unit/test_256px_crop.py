"""The 256-px path's random-resized-crop transform: seeded per epoch, a new window each epoch,
the centre crop for evaluation. (Tokenizing 256-px img2dataset shards: tests/integration/test_256px.py.)"""

from __future__ import annotations

import numpy as np


def test_random_resized_crop_at_256_is_seeded_and_varies():
    import io

    from PIL import Image

    from tokenmill.pipeline.shards.images import Draw, TransformConfig, decode_image
    from tokenmill.pipeline.shards.synthetic import photo_like_images

    jpg = io.BytesIO()
    Image.fromarray(photo_like_images(1, size=256)[0]).save(jpg, format="JPEG")
    transform = TransformConfig(size=256, resize="random-resized-crop", crop_scale=0.35)
    crops = [decode_image(jpg.getvalue(), transform, Draw(0, epoch, "k")) for epoch in range(3)]
    assert all(c.shape == (256, 256, 3) for c in crops)
    assert not np.array_equal(crops[0], crops[1])  # each epoch a new window, even at the target size
    assert np.array_equal(crops[0], decode_image(jpg.getvalue(), transform, Draw(0, 0, "k")))  # seeded
    centre = decode_image(jpg.getvalue(), transform.for_eval())
    assert np.array_equal(centre, decode_image(jpg.getvalue(), TransformConfig(size=256)))

