"""A process that takes a dir's lease (io/lease.py) as a driver does, for the lease tests: started as
`python lease_holder.py DIR START_AT HOLD_S BEAT_S STALE_S SETTLE_S`, it waits until START_AT (seconds since the Unix
epoch, so that several start their claims together), prints `holding` once it holds the lease, holds it HOLD_S
seconds and releases it; refused, it prints the refusal as its one line on stderr and exits 2, like `ray-resnet`."""

import sys
import time

from ray_resnet.errors import DirInUseError
from ray_resnet.io import lease

if __name__ == "__main__":
    directory, (start_at, hold_s, beat_s, stale_s, settle_s) = sys.argv[1], map(float, sys.argv[2:7])
    time.sleep(max(0.0, start_at - time.time()))
    try:
        with lease.held(directory, "run dir", "wait for it to end, or pick another --name",
                        lease.Timing(beat_s, stale_s, settle_s)):
            print("holding", flush=True)
            time.sleep(hold_s)
    except DirInUseError as e:
        print(f"ray-resnet: error: {e}", file=sys.stderr)
        sys.exit(2)
