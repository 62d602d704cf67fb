"""Ray job: train, evaluate, calibrate, publish. `ray job submit --working-dir . -- python jobs/train.py --data s3://... --model-dir s3://...`"""

import sys

from melanoma.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
