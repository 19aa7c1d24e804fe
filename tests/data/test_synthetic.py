import numpy as np
from PIL import Image

from orchestrator.cli import main as cli
from orchestrator.data.manifest import load_manifest
from orchestrator.data.synthetic import DOMAINS, generate_sample, synthesize


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def make(folder: str, seed: int) -> dict:
        counts = {"train": 3, "test": 2}
        return synthesize(
            tmp_path / folder, ["camouflage", "roads"], seed=seed, counts=counts, sheets=False
        )

    a, b, c = make("a", 3), make("b", 3), make("c", 4)
    for d in ("camouflage", "roads"):
        assert [s["sha256"] for s in a[d]["shards"]] == [s["sha256"] for s in b[d]["shards"]]
        assert [s["sha256"] for s in a[d]["shards"]] != [s["sha256"] for s in c[d]["shards"]]


def test_every_domain_gives_nonempty_binary_masks_of_the_image_size():
    for domain in DOMAINS:
        for i in range(5):
            img, mask = generate_sample(domain, 0, "train", i)
            assert img.dtype == np.uint8 and img.shape[2] == 3
            assert mask.shape == img.shape[:2] and set(np.unique(mask)) == {0, 1}
            assert 0.002 < mask.mean() < 0.8, (domain, i, mask.mean())


def test_camouflage_is_harder_than_general_by_colour_contrast():
    """The specialised domains are built to be hard: object and background colours nearly agree."""

    def contrast(domain):
        vals = []
        for i in range(20):
            img, m = generate_sample(domain, 0, "train", i)
            m = m.astype(bool)
            vals.append(np.linalg.norm(img[m].mean(0) - img[~m].mean(0)))
        return float(np.median(vals))

    assert contrast("camouflage") < 0.5 * contrast("general")
    assert contrast("lesions") < 0.5 * contrast("general")


def test_cli_synth_writes_manifests_and_contact_sheets(tmp_path, capsys):
    assert (
        cli(["data", "synth", str(tmp_path), "--domains", "lesions", "general", "--scale", "0.05"])
        == 0
    )
    out = capsys.readouterr().out
    assert "dataset lesions" in out and "contact sheet" in out
    m = load_manifest(tmp_path / "lesions", verify=True)
    assert m["counts"] == {"test": 4, "train": 6, "val": 2} and m["generator"]["seed"] == 0
    sheet = Image.open(tmp_path / "general" / "contact_sheet.png")
    assert sheet.size == (640, 640)
    # Outlines are drawn in pure red somewhere on the sheet.
    arr = np.asarray(sheet)
    assert ((arr[..., 0] == 255) & (arr[..., 1] == 0) & (arr[..., 2] == 0)).sum() > 100
