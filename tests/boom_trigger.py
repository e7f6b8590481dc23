"""A drift trigger that fails for real (raises mid-round, after the shard has changed state)
at its Nth call when $FL_SIM_TEST_BOOM_AT_CALL=N is set: for the resume tests."""

import os

from clients.triggers import Drift


class BoomAt(Drift):
    calls = 0

    def decide(self, view):
        self.calls += 1
        if str(self.calls) == os.environ.get("FL_SIM_TEST_BOOM_AT_CALL"):
            raise RuntimeError("boom: the shard's process died")
        return super().decide(view)


_fired = False  # per process: a failure that does not come back once the shard is rebuilt


class BoomOnce(Drift):
    calls = 0

    def decide(self, view):
        global _fired
        self.calls += 1
        if not _fired and str(self.calls) == os.environ.get("FL_SIM_TEST_BOOM_AT_CALL"):
            _fired = True
            raise RuntimeError("boom: a passing fault")
        return super().decide(view)
