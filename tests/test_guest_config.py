"""The default guest kernel's config fragment keeps what this project's hosts need.

``vmrun image build tiny`` checks that Kconfig kept every line of the fragment; these check
that the lines that matter are there at all (each was a hang or a crash before it was added).
"""

from __future__ import annotations

from pathlib import Path

from vmrun.image import check_config, fragment_options

FRAGMENT = Path(__file__).resolve().parents[1] / "vmrun" / "guest" / "tiny.config"


def test_the_tick_is_an_hrtimer_that_skips_missed_ticks() -> None:
    # tinyconfig's periodic tick on the TSC-deadline LAPIC re-runs the tick for every tick it
    # missed; with guest kernel code emulated (kvm-pvm) it never caught up (issue 8).
    opts = fragment_options(FRAGMENT.read_text())
    assert opts.get("CONFIG_HIGH_RES_TIMERS") == "y"
    assert opts.get("CONFIG_NO_HZ_IDLE") == "y"
    assert opts.get("CONFIG_HZ_PERIODIC", "n") == "n"


def test_a_dropped_option_is_reported() -> None:
    frag = "CONFIG_HIGH_RES_TIMERS=y\n# CONFIG_HZ_PERIODIC is not set\n"
    final = "CONFIG_HZ_PERIODIC=y\n"
    assert check_config(frag, final) == [
        "CONFIG_HIGH_RES_TIMERS: wanted y, kernel config has n",
        "CONFIG_HZ_PERIODIC: wanted n, kernel config has y"]
