"""Device profiles: shipped ones validate; bad ones fail with one error naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rf2.core.errors import ProfileError
from rf2.hetero.devices import Distribution, list_profiles, load_profile, profile_from_dict

SHIPPED = ["flash", "rf2-3tier", "uniform"]


def _tier(name: str = "low", share: float = 1.0, **over: Any) -> dict[str, Any]:
    tier: dict[str, Any] = {
        "name": name, "share": share,
        "compute_ms_per_example": {"kind": "constant", "value": 10.0},
        "download_mbps": {"kind": "lognormal", "median": 20.0, "sigma": 0.3},
        "upload_mbps": 5.0,
    }
    tier.update(over)
    return tier


def _err(data: Any) -> ProfileError:
    with pytest.raises(ProfileError) as info:
        profile_from_dict(data, "bad")
    return info.value


def test_shipped_profiles_validate() -> None:
    assert list_profiles() == SHIPPED
    for name in SHIPPED:
        prof = load_profile(name)
        assert prof.name == name
        assert abs(prof.shares.sum() - 1.0) <= 1e-6
    assert load_profile("uniform").tier_names == ("all",)
    assert load_profile("rf2-3tier").tier_names == ("low", "mid", "high")
    assert load_profile("flash").tier_names == ("low", "mid", "high", "flagship")


def test_shipped_profiles_cite_flash_and_order_tiers_slowest_first() -> None:
    root = Path(__file__).resolve().parent.parent / "device_profiles"
    for name in SHIPPED:
        header = (root / f"{name}.yaml").read_text()
        assert "FLASH" in header and "BSD-2-Clause" in header
    for name in ("rf2-3tier", "flash"):
        speeds = [t.compute_ms_per_example.center() for t in load_profile(name).tiers]
        assert speeds == sorted(speeds, reverse=True)
        drops = [t.dropout for t in load_profile(name).tiers]
        assert drops == sorted(drops, reverse=True)
    rf2 = load_profile("rf2-3tier")
    mean_dropout = float(np.mean([t.dropout for t in rf2.tiers]))
    assert mean_dropout > 0.10  # FLASH: > 10% of selected clients fail


def test_load_from_path_and_number_shorthand(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"tiers": [_tier("a", 0.25), _tier("b", 0.75)]}))
    prof = load_profile(str(path))
    assert prof.name == "mine" and prof.tier_names == ("a", "b")
    assert prof.tiers[0].upload_mbps == Distribution(kind="constant", value=5.0)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"tiers": [_tier("a", 0.5), _tier("b", 0.4)]}, "tiers[*].share"),
        ({"tiers": [_tier(compute_ms_per_example={"kind": "constant", "value": -1.0})]},
         "tiers[0].compute_ms_per_example.value"),
        ({"tiers": [_tier(download_mbps={"kind": "lognormal", "median": 0, "sigma": 1})]},
         "tiers[0].download_mbps.median"),
        ({"tiers": [_tier(upload_mbps=-3)]}, "tiers[0].upload_mbps.value"),
        ({"tiers": [_tier(dropout=1.5)]}, "tiers[0].dropout"),
        ({"tiers": [_tier(availability=-0.1)]}, "tiers[0].availability"),
        ({"tiers": [_tier(share=1.2)]}, "tiers[0].share"),
        ({"tiers": [_tier(availability_period=0)]}, "tiers[0].availability_period"),
        ({"tiers": [_tier(speed=3)]}, "tiers[0].speed"),
        ({"tier": []}, "tier"),
        ({}, "tiers"),
        ({"tiers": []}, "tiers"),
        ({"tiers": [_tier("a", 0.5), _tier("a", 0.5)]}, "tiers[*].name"),
        ({"tiers": [_tier("a|b")]}, "tiers[0].name"),
        ({"tiers": [_tier(compute_ms_per_example={"kind": "gamma", "value": 1})]},
         "tiers[0].compute_ms_per_example.kind"),
        ({"tiers": [_tier(compute_ms_per_example={"kind": "constant", "value": 1, "sigma": 1})]},
         "tiers[0].compute_ms_per_example.sigma"),
        ({"tiers": [_tier(compute_ms_per_example={"kind": "lognormal", "median": 1})]},
         "tiers[0].compute_ms_per_example.sigma"),
    ],
)
def test_invalid_profiles_name_the_field(data: dict[str, Any], field: str) -> None:
    err = _err(data)
    assert err.field == field
    assert err.profile == "bad"
    assert field in str(err)


def test_unknown_key_lists_allowed_keys() -> None:
    err = _err({"tiers": [_tier(speed=3)]})
    assert "compute_ms_per_example" in err.allowed and "dropout" in err.allowed


def test_unknown_profile_lists_shipped_ones(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("no-such-profile")
    assert info.value.field == "profile"
    assert all(name in info.value.allowed for name in SHIPPED)
    with pytest.raises(ProfileError):
        load_profile(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "broken.yaml"
    bad.write_text("tiers: [\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(bad))
    assert info.value.field == "yaml"


def test_distribution_samples() -> None:
    rng = np.random.default_rng(0)
    const = Distribution(kind="constant", value=3.5).sample(rng, 5)
    assert const.tolist() == [3.5] * 5
    logn = Distribution(kind="lognormal", median=40.0, sigma=0.5).sample(rng, 20000)
    assert abs(np.median(logn) / 40.0 - 1) < 0.03
    assert abs(np.log(logn).std() - 0.5) < 0.02
    norm = Distribution(kind="normal", mean=1.0, std=5.0).sample(rng, 2000)
    assert (norm > 0).all()
    norm = Distribution(kind="normal", mean=100.0, std=1.0).sample(rng, 5000)
    assert abs(norm.mean() - 100.0) < 0.1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=6), st.integers(0, 50))
def test_any_normalised_shares_validate(weights: list[int], size: int) -> None:
    total = sum(weights)
    tiers = [_tier(f"t{i}", w / total) for i, w in enumerate(weights)]
    prof = profile_from_dict({"tiers": tiers}, "gen")
    assert len(prof.tiers) == len(weights)
    draws = prof.tiers[0].download_mbps.sample(np.random.default_rng(1), size)
    assert draws.shape == (size,) and (draws > 0).all()
