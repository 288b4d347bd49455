"""What `pair show` says about a running job."""
from target.views import job_text


def show(idle_rate: float | None) -> dict:
    return {"size": 1 << 30, "extent_size": 1 << 16, "offline": None,
            "progress": {"job": "restore", "protected": True, "error": None, "paused": False,
                         "extents_done": 4096, "extents_total": 16384, "rate": 300e6,
                         "eta": 3.0, "idle_rate": idle_rate}}


def test_a_running_job_shows_the_copiers_measured_idle_rate():
    """The floor under host load is a share of it: an operator sees what
    the copier measured (restore_core.copier: Copier._calibrate)."""
    assert "idle rate 2.5 GiB/s" in job_text(show(2.5 * (1 << 30)))
    assert "idle rate" not in job_text(show(None))          # not measured yet
