"""Every time bound of a plugin call, in one place.

- call(timeout): how long a script may take before its watchdog answers for it,
  3 x the SR's `timeout` + 5 s: connecting (librados' client_mount_timeout),
  an operation that waits on a monitor or an OSD (its op timeouts), one more for
  undoing what a failure left, and MARGIN for Python and the answer. Operations
  that take long re-arm the watchdog at each step of progress (the collector,
  a diff, a flatten), so the bound is on a step, not on the operation.
- wait(timeout): how long, from now, a call may wait for another operation to
  end (a lock it holds, a background flatten): LOCK_WAIT at most, and always
  short enough that the call still has a `timeout` for its own work and MARGIN
  to answer before its watchdog, so that a busy volume gives `Busy`, never the
  watchdog's error (at timeout 5: 10 s). Waits one after the other share it.
- Retry(seconds): the one policy of every loop that tries again what another
  script holds or changed meanwhile (a cluster lock, a compare-and-set that
  lost, a background flatten): jittered pauses from FIRST_PAUSE, doubling up to
  LONGEST_PAUSE, for `seconds`; the loop then gives its own error (Busy).
  CHANGE_RETRY is how long a compare-and-set on a record is retried.
"""

import binascii
import os
import time

from xcp_rbd import protocol

LOCK_WAIT = 20.0
MARGIN = 5
CHANGE_RETRY = 10.0
FIRST_PAUSE = 0.005
LONGEST_PAUSE = 0.2


def call(timeout):
    return 3 * timeout + MARGIN


def wait(timeout):
    remaining = protocol.watchdog_remaining()
    if remaining is None:  # no watchdog: a tool or a test in-process
        return LOCK_WAIT
    return max(0.0, min(LOCK_WAIT, remaining - timeout - MARGIN))


class Retry(object):
    """Pauses between the attempts of a loop, for `seconds` from now (see above)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.stop = time.time() + seconds
        self.pause = FIRST_PAUSE

    def again(self):
        """Pause before the next attempt; False, at once, once the time is up."""
        if time.time() > self.stop:
            return False
        time.sleep(jitter(self.pause / 2, self.pause))
        self.pause = min(self.pause * 2, LONGEST_PAUSE)
        return True


def jitter(low, high):
    """A random pause length in [low, high], to spread retries of racing scripts."""
    return low + (high - low) * (int(binascii.hexlify(os.urandom(2)), 16) / 65535.0)
