"""The rtslib-fb side's pure helpers (the kernel run is in tests/vm)."""
from target.lio.rts import free_hba_index


def test_free_hba_index_reads_configfs_not_a_cache(tmp_path):
    # what targetcli (another process) made: user_1, fileio_0; plus an alua dir of the kernel
    for d in ("user_0", "user_1", "fileio_2", "alua", "rd_mcp_4"):
        (tmp_path / d).mkdir()
    assert free_hba_index(str(tmp_path)) == 3
    assert free_hba_index(str(tmp_path / "user_1")) == 0
