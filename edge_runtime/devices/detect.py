"""Which device this is and which power mode it is in.

Jetson: /proc/device-tree/compatible carries the module SKU, NUL-separated and most specific first: a developer
kit names its carrier board first ("nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234"), a
board flashed for the Super modes adds "-super" ("nvidia,p3768-0000+p3767-0005-super").
/proc/device-tree/model is a marketing name (not the RAM size), /etc/nv_tegra_release the L4T release.
The power mode comes from `nvpmodel -q` ("NV Power Mode: NAME" then the id) or, without root, from
/var/lib/nvpmodel/status ("pmode:000N"). Desktop GPUs: NVML. Otherwise the CPU profile. `root` lets
tests point all file reads at a fake tree.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.devices.profile import DeviceProfile, ProfileError, list_profiles, load_profile

CPU_PROFILE = "cpu-generic"
# JetPack 6.2 ("Super") modes exist when the nvpmodel config names MAXN_SUPER; the R36.4.3+ releases ship them.
SUPER_MODE_NAMES = ("MAXN_SUPER",)


@dataclass
class Detection:
    profile: str
    power_mode: str | None
    source: str  # how it was decided, for `profile detect`
    details: dict


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


_MODULE = re.compile(r"(p\d{4}-\d{4})(-super)?")


def _compatible(root: Path) -> list[str]:
    text = _read(root / "proc/device-tree/compatible") or ""
    return [e.strip().removeprefix("nvidia,") for e in text.split("\x00") if e.strip()]


def module_skus(compatible: list[str]) -> list[str]:
    """The module SKUs the compatible list names, in its order: of "CARRIER+MODULE" the module."""
    skus = []
    for entry in compatible:
        m = _MODULE.fullmatch(entry.rsplit("+", 1)[-1])
        if m and m.group(1) not in skus:
            skus.append(m.group(1))
    return skus


def flashed_super(compatible: list[str]) -> bool:
    """The device tree of a board flashed for the Super modes (JetPack 6.2) ends its module SKU in "-super"."""
    return any(e.endswith("-super") for e in compatible)


def read_power_mode(root: Path = Path("/"), use_nvpmodel: bool = True) -> tuple[str | None, int | None]:
    """(name, id) of the current nvpmodel mode; (None, id) when only the id is known."""
    if use_nvpmodel and root == Path("/") and shutil.which("nvpmodel"):
        try:
            out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        m = re.search(r"NV Power Mode:\s*(\S+)\s*\n\s*(\d+)", out)
        if m:
            return m.group(1), int(m.group(2))
    status = _read(root / "var/lib/nvpmodel/status")
    if status:
        m = re.search(r"pmode:\s*0*(\d+)", status)
        if m:
            return None, int(m.group(1))
    return None, None


def _jetson_profile_for(sku: str, conf_text: str | None, super_board: bool) -> str | None:
    """The profile whose module_skus list the SKU; Super variants when the device tree says so or the board's
    nvpmodel config has Super modes (a container often cannot read that config)."""
    super_modes = super_board or (bool(conf_text) and any(n in conf_text for n in SUPER_MODE_NAMES))
    candidates = []
    for name in list_profiles():
        try:
            p = load_profile(name)
        except ProfileError:
            continue
        if p.kind == "jetson" and sku in p.module_skus:
            candidates.append(p)
    if not candidates:
        return None
    for p in candidates:
        if any(m.name in SUPER_MODE_NAMES for m in p.power_modes) == super_modes:
            return p.name
    return candidates[0].name


def mode_name_for_id(profile: DeviceProfile | None, mode_id: int, conf_text: str | None) -> str | None:
    """Map an nvpmodel id to a name through the board's own config when readable (ids differ per
    release), else through the profile (None: the config alone)."""
    if conf_text:
        m = re.search(rf"<\s*POWER_MODEL\s+ID={mode_id}\s+NAME=(\S+)\s*>", conf_text)
        if m:
            return m.group(1)
    named = [m.name for m in profile.power_modes if m.id == mode_id] if profile else []
    return named[0] if len(named) == 1 else None


def _nvml_gpu() -> str | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return name.decode() if isinstance(name, bytes) else name


def detect(root: str | Path = "/", use_nvml: bool = True) -> Detection:
    root = Path(root)
    compatible = _compatible(root)
    skus = module_skus(compatible)
    if skus:
        conf, super_board = _read(root / "etc/nvpmodel.conf"), flashed_super(compatible)
        # the first SKU a profile knows: a carrier board named alone, or an unknown module, is passed over
        sku, name = next(((s, n) for s in skus if (n := _jetson_profile_for(s, conf, super_board))), (skus[0], None))
        details = {"module_sku": sku, "model": (_read(root / "proc/device-tree/model") or "").strip("\x00\n "),
                   "l4t_release": (_read(root / "etc/nv_tegra_release") or "").splitlines()[0:1]}
        if name is None:
            return Detection(CPU_PROFILE, None, f"Jetson module {sku} has no profile", details)
        profile = load_profile(name)
        mode_name, mode_id = read_power_mode(root)
        if mode_name is None and mode_id is not None:
            mode_name = mode_name_for_id(profile, mode_id, conf)
        details["power_mode_id"] = mode_id
        return Detection(name, mode_name, "device tree", details)
    gpu = _nvml_gpu() if use_nvml else None
    if gpu:
        for name in list_profiles():
            try:
                p = load_profile(name)
            except ProfileError:
                continue
            if p.kind == "gpu" and any(g.lower() in gpu.lower() for g in p.gpu_names):
                return Detection(name, p.default_power_mode, "NVML", {"gpu": gpu})
        return Detection(CPU_PROFILE, None, f"NVML GPU {gpu!r} has no profile", {"gpu": gpu})
    return Detection(CPU_PROFILE, None, "no Jetson device tree, no NVML GPU", {})


def mode_reader(profile: DeviceProfile | None, root: str | Path = "/"):
    """A no-argument callable giving the board's current power-mode name (None when unknown), for
    Runtime.watch_power_mode. It is called every second for as long as the runtime lives: nvpmodel's status file
    (which `nvpmodel -m` rewrites) is read first, and nvpmodel itself started only when that file cannot name the
    mode, rather than a process started on the robot every second."""
    root = Path(root)

    def read() -> str | None:
        for use_nvpmodel in (False, True):
            name, mode_id = read_power_mode(root, use_nvpmodel=use_nvpmodel)
            if name is None and mode_id is not None:
                name = mode_name_for_id(profile, mode_id, _read(root / "etc/nvpmodel.conf"))
            if name is not None:
                return name
        return None

    return read
