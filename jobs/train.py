"""Ray job: train, evaluate, calibrate, publish.

    ray job submit --working-dir . -- python jobs/train.py --data s3://.../work --model-dir s3://.../models
    ray job submit --working-dir . -- python jobs/train.py --data-root s3://.../data --work s3://.../work --model-dir s3://.../models

With --data-root it runs `melanoma pipeline` (split, augment, add the labelled sources, train the default
recipe); otherwise `melanoma train` on a prepared work dir.
"""

import sys

from melanoma.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["pipeline" if "--data-root" in args else "train", *args]))
