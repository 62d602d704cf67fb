"""Ray job: score one night's archive. `ray job submit --working-dir . -- python jobs/nightly_score.py --date 2026-11-25`"""

import sys

from melanoma.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
