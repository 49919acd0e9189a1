"""The lock file: what `make install` compares the venv against, and setup.cfg's ranges.

Run: .venv/bin/python -m pytest -q tests/test_lock.py
"""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
check_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_lock)


def test_the_lock_satisfies_setup_cfg_and_pins_torch():
    pins = check_lock.read_lock(str(ROOT / "requirements.lock"))
    assert check_lock.unmet_requirements(pins, str(ROOT / "setup.cfg")) == []
    assert pins["torch"] == "2.11.0" and pins["torchaudio"] == "2.11.0"
    # transformers 5.24+ needs a peft that does not exist yet (adapters fail to load)
    from packaging.version import Version
    assert Version(pins["transformers"]) < Version("5.24")


def test_difference_names_missing_changed_and_extra_packages():
    pins = {"torch": "2.11.0", "peft": "0.21.2", "pip": "1.0"}
    have = {"torch": "2.11.0", "peft": "0.22.0", "rich": "13.0", "pip": "25.0"}
    assert check_lock.difference(pins, have) == ["version   peft==0.22.0 (lock: 0.21.2)",
                                                 "not locked rich==13.0"]
    assert check_lock.difference({"nltk": "3.10.4"}, {}) == ["missing   nltk==3.10.4"]


def test_a_range_changed_without_relocking_is_reported(tmp_path):
    cfg = tmp_path / "setup.cfg"
    cfg.write_text("[options]\ninstall_requires =\n    transformers>=5.0,<5.24  # comment\n    Py_Yaml\n")
    assert check_lock.unmet_requirements({"transformers": "5.23.0", "py-yaml": "6.0"}, str(cfg)) == []
    (msg,) = check_lock.unmet_requirements({"transformers": "5.25.0", "py-yaml": "6.0"}, str(cfg))
    assert "transformers" in msg and "5.25.0" in msg
    assert check_lock.canonical("Py_Yaml") == check_lock.canonical("py.yaml") == "py-yaml"
