"""`rayrack gpu-check` on real nvidia-smi captures (../shared/fixtures/gpu-ecosystem/nvidia-smi-captures, split
into capture files at test time), on the parser data in tests/infra/data, and on copies of real outputs with a
fault put in: each fault is named under auto with no matching profile. Then the gpu_validate module, packed by
Ansible, against fake nvidia-smi commands that print real or broken outputs: it always writes its report."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import required

from rayrack import gpu_check

from .conftest import REPO, ROLES

DATA = Path(__file__).parent / "data" / "nvidia-smi"
CAPTURE_SECTIONS = {"nvidia-smi topo -m": "topo", "nvidia-smi nvlink -s": "nvlink", "nvidia-smi -q": "q"}
BANNER = re.compile(r"^#{20,}\n# (\S+) :: .*\n(?:# \$ (.*)\n)?#{20,}\n", re.M)


def split_capture(capture: Path, out: Path, kinds: tuple[str, ...] = ("query", "topo", "nvlink", "q")) -> Path:
    """One nvidia_gpu_exporter capture (sections under `# $ nvidia-smi ...` banners) -> capture files in out;
    the idle and under-load readings of -q and --query-gpu go into one file each, idle first."""
    parts = BANNER.split(capture.read_text(encoding="utf-8"))
    bodies: dict[str, list[str]] = {}
    for i in range(1, len(parts) - 2, 3):
        command, body = (parts[i + 1] or "").strip(), parts[i + 2]
        kind = "query" if command.startswith("nvidia-smi --query-gpu=") else CAPTURE_SECTIONS.get(command)
        if kind in kinds:
            bodies.setdefault(kind, []).append(body.rstrip("\n") + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for kind, texts in bodies.items():
        (out / gpu_check.CAPTURE_FILES[kind]).write_text("".join(texts), encoding="utf-8")
    return out


def capture(name: str) -> Path:
    return required.ecosystem(f"nvidia-smi-captures/{name}")


H100 = "linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt"
H100_MIG = "linux-x86_64__nvidia-h100-mig__590.48.01.txt"
H200 = "linux-x86_64__nvidia-h200__590.48.01.txt"
H200_MIG = "linux-x86_64__nvidia-h200-mig__590.48.01.txt"
L40S = "linux-x86_64__nvidia-l40s__595.80.txt"


def gpu_check_cli(directory: Path, *args: str) -> tuple[int, str, str]:
    """The real command line: python -m rayrack gpu-check."""
    proc = subprocess.run([sys.executable, "-m", "rayrack", "gpu-check", "--captures", str(directory), *args],
                          capture_output=True, text=True, check=False, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def report(directory: Path, *args: str) -> tuple[int, dict]:
    rc, out, err = gpu_check_cli(directory, "--json", *args)
    assert rc in (0, 1), err
    return rc, json.loads(out)


def named(rep: dict) -> set[tuple[str, str, str]]:
    return {(f["severity"], f["check"], f["gpu"]) for f in rep["findings"]}


# --- Real captures -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "model", "cpus"), [(H100, "NVIDIA H100 80GB HBM3", "0-19"),
                                                     (H200, "NVIDIA H200", "0-23")])
def test_single_sxm_gpu_with_its_nvlinks_up_is_consistent(tmp_path, name, model, cpus):
    rc, rep = report(split_capture(capture(name), tmp_path))
    assert rc == 0 and rep["ok"] is True
    # No shipped profile describes one SXM GPU: self-consistency alone, which finds nothing.
    assert rep["profile"] is None
    assert [(f["severity"], f["check"]) for f in rep["findings"]] == [("note", "profile")]
    observed = rep["observed"]
    assert [g["name"] for g in observed["gpus"]] == [model]
    # topo -m with its ANSI-underlined header: one GPU, so no peers; affinity read from their own columns
    assert observed["topology"] == {"gpus": ["GPU0"], "links": {"GPU0": {}}, "cpu": {"GPU0": cpus},
                                    "numa": {"GPU0": "0"}}
    # 18 NVLink 4 links to the NVSwitches, all at 26.562 GB/s
    assert observed["nvlink"]["0"]["links"] == {str(n): 26.562 for n in range(18)}
    # idle and under load, from the CSV and from -q: PCIe Gen5 x16 as trained, at 0 % and 100 %
    assert [(s["utilization.gpu"], s["pcie.link.gen.current"], s["pcie.link.width.current"])
            for s in observed["samples"]] == [("0 %", "5", "16"), ("100 %", "5", "16"), ("0", "5", "16"),
                                              ("100", "5", "16")]
    assert observed["gpus"][0]["fabric.state"] == "Completed" and observed["gpus"][0]["ecc.mode.current"] == "Enabled"


@pytest.mark.parametrize("name", [H100_MIG, H200_MIG])
def test_mig_gpu_reports_no_nvlink_and_no_remap_state(tmp_path, name):
    rc, rep = report(split_capture(capture(name), tmp_path))
    assert rc == 0 and [(f["severity"], f["check"]) for f in rep["findings"]] == [("note", "profile")]
    status = rep["observed"]["nvlink"]["0"]
    assert status["links"] == {} and status["note"] == "Nvlink queries are not supported for Devices in MIG mode"
    # under MIG the CSV has [N/A] for utilisation and remapped rows; -q fills what it knows
    gpu = rep["observed"]["gpus"][0]
    assert gpu["utilization.gpu"] is None and gpu["remapped_rows.pending"] is None


def test_l40s_has_no_nvlink_and_persistence_off(tmp_path):
    rc, rep = report(split_capture(capture(L40S), tmp_path))
    assert rep["observed"]["nvlink"]["0"]["note"] == "Device does not have or support Nvlink"
    gpu = rep["observed"]["gpus"][0]
    assert (gpu["pcie.link.gen.current"], gpu["pcie.link.gen.max"], gpu["pcie.link.width.current"],
            gpu["pcie.link.width.max"]) == ("4", "4", "16", "16")
    assert gpu["fabric.state"] is None  # N/A: no NVSwitch fabric
    # The capture's table says Persistence-M Off: a setting worth a note, not a fault; nothing is amiss.
    assert rc == 0
    assert [(f["severity"], f["check"]) for f in rep["findings"]] == [("note", "profile"),
                                                                       ("note", "persistence mode")]
    # The single-GPU profile, named, expects persistence on.
    rc, rep = report(split_capture(capture(L40S), tmp_path / "named"), "--profile", "workstation-1")
    assert rc == 1 and ("error", "persistence mode", "Disabled") in [
        (f["severity"], f["check"], f["observed"]) for f in rep["findings"]]


def test_a_named_profile_adds_its_expectations(tmp_path):
    rc, rep = report(split_capture(capture(H200), tmp_path), "--profile", "hgx-h200-8")
    assert rc == 1 and rep["profile"] == "hgx-h200-8"
    assert {(f["check"], f["expected"], f["observed"]) for f in rep["findings"]} == {("count", "8", "1")}


def test_table_output(tmp_path):
    rc, out, _ = gpu_check_cli(split_capture(capture(L40S), tmp_path), "--profile", "workstation-1")
    assert rc == 1
    assert out.splitlines()[0] == ("1 GPU(s); profile: workstation-1; read: nvidia-smi-query-gpu.csv, "
                                   "nvidia-smi-q.txt, nvidia-smi-topo-m.txt, nvidia-smi-nvlink-status.txt")
    assert re.search(r"\| error +\| persistence mode \| GPU0 \| Enabled +\| Disabled +\|", out), out


# --- The parser data in tests/infra/data ---------------------------------------------------------------------
def data_dir(tmp_path: Path, **files: str) -> Path:
    for kind, sample in files.items():
        shutil.copy(DATA / sample, tmp_path / gpu_check.CAPTURE_FILES[kind])
    return tmp_path


@pytest.mark.parametrize(("files", "rc", "findings"), [
    ({"topo": "hgx-h100/topo-m.txt"}, 0, set()),
    ({"topo": "hgx-a100-8gpu/topo-m.txt"}, 0, set()),  # 6 of 8 rows published: read as far as they go
    ({"topo": "pcie-8x-rtx4090/topo-m.txt"}, 0, set()),
    ({"topo": "hgx-a100-4gpu/topo-m.txt"}, 0, set()),
    ({"nvlink": "dgx-a100/nvlink-status.txt"}, 0, set()),
    ({"nvlink": "dgx1-v100/nvlink-status.txt"}, 1, {("error", "NVLink inactive", "GPU3")}),
    ({"query": "pcie-2x-l40s/query-gpu.csv"}, 0, set()),
    ({"dcgm": "pcie-t4/dcgmi-diag.txt"}, 0, set()),
])
def test_published_outputs(tmp_path, files, rc, findings):
    code, rep = report(data_dir(tmp_path, **files))
    assert code == rc
    assert named(rep) - {("note", "profile", "-")} == findings


def test_empty_cpu_affinity_keeps_the_numa_affinity():
    # As printed under a scheduler that restricts CPUs (an HGX H200 under Slurm): no CPU affinity on GPU0.
    text = ("\tGPU0\tGPU1\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
            "GPU0\t X \tNV18\tPIX\t\t0\t\tN/A\n"
            "GPU1\tNV18\t X \tNODE\t56\t1\t\tN/A\n")
    for variant in (text, text.expandtabs(8)):  # as printed, and as pasted with the tabs expanded
        topo = gpu_check.parse_topo(variant)
        assert topo["cpu"] == {"GPU0": None, "GPU1": "56"} and topo["numa"] == {"GPU0": "0", "GPU1": "1"}


def test_header_without_leading_whitespace_and_old_mlx_columns():
    text = ("GPU0\tGPU1\tmlx5_0\tCPU Affinity\tNUMA Affinity\n"
            "GPU0\t X \tNV2\tPIX\t0-23,48-71\t0\n"
            "GPU1\tNV2\t X \tSYS\t24-47,72-95\t1\n"
            "mlx5_0\tPIX\tSYS\t X \n")
    topo = gpu_check.parse_topo(text)
    assert topo["links"] == {"GPU0": {"GPU1": "NV2"}, "GPU1": {"GPU0": "NV2"}}
    assert topo["cpu"] == {"GPU0": "0-23,48-71", "GPU1": "24-47,72-95"} and topo["numa"] == {"GPU0": "0", "GPU1": "1"}


# --- Faults put into copies of real outputs: named under auto, with no profile matching --------------------
def edit_csv(path: Path, change) -> None:
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8")), skipinitialspace=True))
    header = [h.split(" [")[0] for h in rows[0]]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for row in rows:
        if [c.split(" [")[0] for c in row] != header:
            values = dict(zip(header, row, strict=True))
            change(values)
            row = [values[h] for h in header]
        writer.writerow(row)
    path.write_text(out.getvalue(), encoding="utf-8")


def two_gpu_node(tmp_path: Path, name: str = H200) -> Path:
    """The capture's GPU and a copy of it as GPU 1: two GPUs, which no shipped profile describes."""
    node = split_capture(capture(name), tmp_path / "node", ("query", "nvlink"))
    query = node / gpu_check.CAPTURE_FILES["query"]
    rows = query.read_text(encoding="utf-8").splitlines()
    header, data = rows[0], [r for r in rows[1:] if r != rows[0]]
    second = [r.replace(", 0, ", ", 1, ", 1).replace("00000000:00:09.0", "00000000:00:0A.0")
               .replace("GPU-00000000-0000-0000-0000-000000000000", "GPU-00000000-0000-0000-0000-000000000001")
              for r in data]
    query.write_text("\n".join([header, data[0], second[0], header, data[1], second[1]]) + "\n", encoding="utf-8")
    status = node / gpu_check.CAPTURE_FILES["nvlink"]
    text = status.read_text(encoding="utf-8")
    status.write_text(text + text.replace("GPU 0:", "GPU 1:").replace("0000-000000000000)", "0000-000000000001)"),
                      encoding="utf-8")
    return node


def test_two_gpu_copy_is_consistent_with_no_profile(tmp_path):
    rc, rep = report(two_gpu_node(tmp_path))
    assert rc == 0 and rep["profile"] is None
    assert named(rep) == {("note", "profile", "-")}
    assert [g["index"] for g in rep["observed"]["gpus"]] == ["0", "1"] and len(rep["observed"]["samples"]) == 4


def fault_nvlink(node: Path, gpu: int, link: int, state: str) -> None:
    path = node / gpu_check.CAPTURE_FILES["nvlink"]
    blocks = re.split(r"(?m)^(?=GPU \d+:)", path.read_text(encoding="utf-8"))
    blocks = [re.sub(rf"(?m)^(\s*Link {link}: ).*$", rf"\g<1>{state}", b) if b.startswith(f"GPU {gpu}:") else b
              for b in blocks]
    path.write_text("".join(blocks), encoding="utf-8")


def fault_query(node: Path, gpu: int, **fields: str) -> None:
    def change(values):
        if values["index"] == str(gpu):
            values.update({k.replace("__", "."): v for k, v in fields.items()})
    edit_csv(node / gpu_check.CAPTURE_FILES["query"], change)


def test_degraded_nvlink_is_named(tmp_path):
    node = two_gpu_node(tmp_path)
    fault_nvlink(node, 1, 5, "1.0 GB/s")
    rc, rep = report(node)
    assert rc == 1 and rep["profile"] is None
    bad = [f for f in rep["findings"] if f["severity"] == "error"]
    assert [(f["check"], f["gpu"], f["expected"], f["observed"]) for f in bad] == [
        ("NVLink bandwidth", "GPU1", "26.562 GB/s like the node's other links", "link 5: 1.0 GB/s")]


def test_inactive_nvlink_is_named(tmp_path):
    node = two_gpu_node(tmp_path)
    fault_nvlink(node, 0, 7, "<inactive>")
    rc, rep = report(node)
    assert rc == 1
    assert [(f["check"], f["gpu"], f["observed"]) for f in rep["findings"] if f["severity"] == "error"] == [
        ("NVLink inactive", "GPU0", "links 7 inactive")]


def test_x8_link_is_an_error_even_at_idle(tmp_path):
    node = two_gpu_node(tmp_path)
    fault_query(node, 1, pcie__link__width__current="8")
    rc, rep = report(node)
    assert rc == 1
    assert [(f["severity"], f["check"], f["gpu"], f["expected"], f["observed"]) for f in rep["findings"]
            if f["check"].startswith("PCIe")] == [("error", "PCIe width", "GPU1", "x16", "x8")]


def test_pcie_generation_below_max_under_load_is_an_error(tmp_path):
    node = two_gpu_node(tmp_path)
    edit_csv(node / gpu_check.CAPTURE_FILES["query"],
             lambda v: v.update({"pcie.link.gen.current": "3"}) if v["index"] == "0" else None)
    rc, rep = report(node)
    assert rc == 1
    pcie = [f for f in rep["findings"] if f["check"] == "PCIe gen"]
    assert [(f["severity"], f["gpu"], f["observed"]) for f in pcie] == [("error", "GPU0", "Gen3 at 100% utilisation")]


def test_pcie_generation_below_max_at_idle_is_a_note(tmp_path):
    node = two_gpu_node(tmp_path)
    edit_csv(node / gpu_check.CAPTURE_FILES["query"],
             lambda v: v.update({"pcie.link.gen.current": "1"}) if v["utilization.gpu"] == "0 %" else None)
    rc, rep = report(node)
    assert rc == 0
    pcie = [f for f in rep["findings"] if f["check"] == "PCIe gen"]
    assert [(f["severity"], f["gpu"], f["observed"]) for f in pcie] == [("note", "GPU0", "Gen1 at 0% utilisation"),
                                                                       ("note", "GPU1", "Gen1 at 0% utilisation")]


def test_nv12_pair_among_nv18_is_named(tmp_path):
    text = (DATA / "hgx-h100" / "topo-m.txt").read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    for row, col in ((1, 6), (6, 1)):  # the matrix is tab-expanded: cell col of row GPU<row> sits at 8 * (col + 1)
        line = lines[row + 1]
        at = 8 * (col + 1)
        assert line[at:at + 4] == "NV18"
        lines[row + 1] = line[:at] + "NV12" + line[at + 4:]
    (tmp_path / gpu_check.CAPTURE_FILES["topo"]).write_text("".join(lines), encoding="utf-8")
    rc, rep = report(tmp_path)
    assert rc == 1 and rep["profile"] is None
    assert [(f["check"], f["gpu"], f["expected"], f["observed"]) for f in rep["findings"] if f["severity"] == "error"] \
        == [("NVLink pair", "GPU1-GPU6", "NV18 like the node's other GPU pairs", "NV12")]


def test_asymmetric_direct_attach_pair_is_named(tmp_path):
    text = (DATA / "pcie-8x-rtx4090" / "topo-m.txt").read_text(encoding="utf-8")
    text = text.replace("GPU0\t X \tSYS", "GPU0\t X \tPHB", 1)
    (tmp_path / gpu_check.CAPTURE_FILES["topo"]).write_text(text, encoding="utf-8")
    rc, rep = report(tmp_path)
    assert rc == 1
    assert [(f["check"], f["gpu"], f["observed"]) for f in rep["findings"] if f["severity"] == "error"] == [
        ("topology symmetry", "GPU0-GPU1", "PHB vs SYS")]


def test_two_models_are_named(tmp_path):
    node = two_gpu_node(tmp_path)
    fault_query(node, 1, name="NVIDIA H100 80GB HBM3")
    rc, rep = report(node)
    assert rc == 1
    assert [(f["check"], f["observed"]) for f in rep["findings"] if f["severity"] == "error"] == [
        ("GPU models", "NVIDIA H100 80GB HBM3: GPU1; NVIDIA H200: GPU0")]


def test_ecc_off_on_h100_is_named(tmp_path):
    node = two_gpu_node(tmp_path, H100)
    fault_query(node, 1, ecc__mode__current="Disabled")
    rc, rep = report(node)
    assert rc == 1 and rep["profile"] is None
    assert [(f["check"], f["gpu"], f["observed"]) for f in rep["findings"] if f["severity"] == "error"] == [
        ("ECC", "GPU1", "Disabled")]


def test_ecc_off_on_a_geforce_is_fine():
    gpus = [{"index": "0", "name": "NVIDIA GeForce RTX 4090", "ecc.mode.current": "Disabled"}]
    assert gpu_check.self_consistency({"gpus": gpus}) == []


@pytest.mark.parametrize(("fields", "check"), [
    ({"remapped_rows__pending": "Yes"}, "row remapping pending"),
    ({"remapped_rows__failure": "Yes"}, "row remapping failure"),
    ({"retired_pages__pending": "Yes"}, "retired pages pending"),
    ({"fabric__state": "In Progress"}, "fabric state"),
    ({"fabric__status": "Failure"}, "fabric status"),
    ({"driver_version": "590.44.01"}, "driver version"),
])
def test_health_faults_are_named(tmp_path, fields, check):
    node = two_gpu_node(tmp_path)
    fault_query(node, 1, **fields)
    rc, rep = report(node)
    assert rc == 1
    assert [(f["check"], f["gpu"]) for f in rep["findings"] if f["severity"] == "error"] == [
        (check, "-" if check == "driver version" else "GPU1")]


def test_remap_pending_read_from_q(tmp_path):
    node = split_capture(capture(H200), tmp_path, ("q",))
    path = node / gpu_check.CAPTURE_FILES["q"]
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"(Remapped Rows\n(?:.*\n)*?\s+Pending\s+: )No", r"\1Yes", text, count=1)
    path.write_text(text, encoding="utf-8")
    rc, rep = report(node)
    assert rc == 1
    assert ("error", "row remapping pending", "GPU0") in named(rep)


def test_q_xml_is_read(tmp_path):
    xml = """<?xml version="1.0" ?>
<nvidia_smi_log><driver_version>550.54.15</driver_version><attached_gpus>1</attached_gpus>
<gpu id="00000000:18:00.0"><product_name>NVIDIA H100 PCIe</product_name><uuid>GPU-1</uuid>
<persistence_mode>Enabled</persistence_mode>
<pci><pci_bus_id>00000000:18:00.0</pci_bus_id><pci_gpu_link_info>
<pcie_gen><max_link_gen>5</max_link_gen><current_link_gen>5</current_link_gen></pcie_gen>
<link_widths><max_link_width>16x</max_link_width><current_link_width>8x</current_link_width></link_widths>
</pci_gpu_link_info></pci>
<utilization><gpu_util>0 %</gpu_util></utilization><ecc_mode><current_ecc>Enabled</current_ecc></ecc_mode>
<remapped_rows><remapped_row_pending>No</remapped_row_pending><remapped_row_failure>No</remapped_row_failure>
</remapped_rows><fabric><state>N/A</state><status>N/A</status></fabric></gpu></nvidia_smi_log>
"""
    (tmp_path / gpu_check.CAPTURE_FILES["xml"]).write_text(xml, encoding="utf-8")
    rc, rep = report(tmp_path)
    assert rc == 1 and rep["profile"] == "pcie-h100-1"
    # the profile's width check and the self-consistency one name the same GPU once
    assert [(f["check"], f["gpu"], f["expected"], f["observed"]) for f in rep["findings"]] == [
        ("PCIe width", "GPU0", ">= x16", "x16/x8")]


# --- Unusable input: exit 2 with the file and line, never a traceback --------------------------------------
@pytest.mark.parametrize(("files", "message"), [
    ({}, "none of the capture files"),
    ({"topo": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"},
     "nvidia-smi-topo-m.txt: line 1: no topology matrix header"),
    ({"query": "index, name\n0, NVIDIA H200\n1, NVIDIA H200, extra\n"}, "nvidia-smi-query-gpu.csv: line 3: 3 fields"),
    ({"query": "0, NVIDIA H200\n"}, "nvidia-smi-query-gpu.csv: line 1: not a --query-gpu header"),
    ({"nvlink": "garbage\n"}, "nvidia-smi-nvlink-status.txt: line 1: expected a 'GPU n"),
    ({"xml": "<nvidia_smi_log><gpu>\n</nvidia_smi_log>\n"}, "nvidia-smi-q.xml: line 2: not XML"),
    ({"q": "hello\n"}, "nvidia-smi-q.txt: no 'GPU 00000000:xx:xx.x' section"),
    ({"dcgm": "\n\n"}, "dcgmi-diag.txt: empty"),
    ({"topo": b"\tGPU0\n\xff\xfe\x00"}, "nvidia-smi-topo-m.txt: line 2: not text"),
])
def test_unusable_input_exits_2(tmp_path, files, message):
    for kind, content in files.items():
        path = tmp_path / gpu_check.CAPTURE_FILES[kind]
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    rc, out, err = gpu_check_cli(tmp_path)
    assert rc == 2 and out == ""
    assert message in err, err


def test_missing_directory_and_unknown_profile_exit_2(tmp_path):
    rc, _, err = gpu_check_cli(tmp_path / "nope")
    assert rc == 2 and "nope: not a directory" in err
    rc, _, err = gpu_check_cli(tmp_path, "--profile", "dgx")
    assert rc == 2 and "'dgx' is not a shipped profile; known: auto, gb200-4" in err


# --- The module with fake nvidia-smi commands -----------------------------------------------------------------
FAKE = """#!/bin/sh
# nvidia-smi that prints saved outputs from {dir}
case "$*" in
  --query-gpu=*) f=nvidia-smi-query-gpu.csv ;;
  "topo -m") f=nvidia-smi-topo-m.txt ;;
  "nvlink --status") f=nvidia-smi-nvlink-status.txt ;;
  *) echo "unsupported: $*" >&2; exit 2 ;;
esac
[ -f "{dir}/rc" ] && {{ cat "{dir}/$f" 2>/dev/null; exit "$(cat {dir}/rc)"; }}
cat "{dir}/$f"
"""


def fake_nvidia_smi(tmp_path: Path, files: dict[str, str], rc: int | None = None) -> Path:
    saved = tmp_path / "saved"
    saved.mkdir(exist_ok=True)
    for name, text in files.items():
        (saved / name).write_text(text, encoding="utf-8")
    if rc is not None:
        (saved / "rc").write_text(str(rc))
    script = tmp_path / "nvidia-smi"
    script.write_text(FAKE.format(dir=saved))
    script.chmod(0o755)
    return script


def run_fake(tmp_path: Path, script: Path) -> tuple[dict, dict]:
    from .test_gpu_validate import run_module

    report_path = tmp_path / "report.json"
    result = run_module({"profiles": gpu_check.load_profiles(), "nvidia_smi": str(script), "dcgmi": "", "nvml": "off",
                         "report_path": str(report_path)})
    assert report_path.exists(), result
    return result, json.loads(report_path.read_text())


def test_module_on_a_real_capture(tmp_path):
    node = split_capture(capture(H200), tmp_path / "node", ("query", "topo", "nvlink"))
    files = {p.name: p.read_text(encoding="utf-8") for p in node.iterdir()}
    result, saved = run_fake(tmp_path, fake_nvidia_smi(tmp_path, files))
    assert result.get("failed") is not True, result
    assert saved["ok"] is True and saved["profile"] is None
    assert saved["observed"]["topology"]["cpu"] == {"GPU0": "0-23"}


@pytest.mark.parametrize(("files", "rc", "named_input"), [
    ({"nvidia-smi-query-gpu.csv": "index, name\n0, NVIDIA H200\n", "nvidia-smi-topo-m.txt": "\x1b[4mgarbage\n",
      "nvidia-smi-nvlink-status.txt": "what\n"}, None, "no topology matrix header"),
    ({"nvidia-smi-query-gpu.csv": "index, name\n0, NVIDIA H200, 1\n"}, None, "line 2: 3 fields"),
    ({"nvidia-smi-query-gpu.csv": ""}, None, "empty"),
    ({"nvidia-smi-query-gpu.csv": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."},
     9, "couldn't communicate with the NVIDIA driver"),
])
def test_module_never_tracebacks_and_always_writes_the_report(tmp_path, files, rc, named_input):
    result, saved = run_fake(tmp_path, fake_nvidia_smi(tmp_path, files, rc))
    assert result["failed"] is True
    assert saved["ok"] is False
    assert any(f["check"] == "input" and named_input in f["observed"] for f in saved["findings"]), saved["findings"]
    assert named_input in result["msg"]


# --- The cluster report with a host whose check broke --------------------------------------------------------
PLAYBOOK = """
- name: Validate
  hosts: all
  gather_facts: false
  tasks:
    - name: GPU validation
      ansible.builtin.include_role:
        name: gpu_validate
"""


def test_cluster_report_is_written_when_a_host_has_no_report(tmp_path):
    if os.geteuid() != 0:
        required.missing("the role creates its report directory owned by root")
    node = split_capture(capture(H200), tmp_path / "node", ("query", "topo", "nvlink"))
    good = fake_nvidia_smi(tmp_path, {p.name: p.read_text(encoding="utf-8") for p in node.iterdir()})
    (tmp_path / "site.yml").write_text(PLAYBOOK)
    # On "broken" gpu_validate dies the way a module that raises does (MODULE FAILURE, no report); the other
    # modules run.
    crashing = tmp_path / "python-crashing-gpu-validate"
    crashing.write_text(f'#!/bin/sh\ncase "$1" in *AnsiballZ_gpu_validate*) echo "Traceback (most recent call '
                        f'last): boom" >&2; exit 1 ;; esac\nexec {sys.executable} "$@"\n')
    crashing.chmod(0o755)
    (tmp_path / "hosts.yml").write_text(json.dumps({"all": {"hosts": {
        "good": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                 "gpu_validate_profile": "workstation-1"},
        # the module's shebang is python3: Ansible runs it with ansible_python3_interpreter
        "broken": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                   "ansible_python3_interpreter": str(crashing)},
    }, "vars": {"rayrack_state_dir": str(tmp_path / "state"), "gpu_validate_nvidia_smi": str(good),
                "gpu_validate_dcgmi": "", "gpu_validate_cluster_report": str(tmp_path / "cluster.json")}}}))
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(tmp_path / "hosts.yml"),
                           str(tmp_path / "site.yml")], capture_output=True, text=True, check=False,
                          env={**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
                               "ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_PIPELINING": "0"})  # the module as a file
    assert proc.returncode == 2, proc.stdout + proc.stderr  # the broken host fails, after the report
    cluster = json.loads((tmp_path / "cluster.json").read_text())
    assert cluster["ok"] is False
    assert cluster["hosts"]["good"]["ok"] is True
    assert cluster["hosts"]["good"]["profile"] == "workstation-1"  # the role read files/gpu_profiles.json
    assert cluster["hosts"]["broken"]["findings"][0]["observed"] == "no report"


def test_a_node_whose_gpus_are_all_gone_is_a_finding(tmp_path):
    # The driver answers and lists no GPU (fallen off the bus): not "consistent".
    (tmp_path / "nvidia-smi-query-gpu.csv").write_text("index, name, uuid, pci.bus_id, driver_version\n")
    rc, rep = report(tmp_path)
    assert rc == 1 and ("GPU count", "at least one GPU") in [(f["check"], f["expected"]) for f in rep["findings"]]


def test_a_busier_node_rewrites_no_report(tmp_path):
    """Utilisation moves between runs; the report (and so the task) changes only when the verdict's inputs do."""
    def query(utilization: int, driver: str = "590.48.01") -> dict[str, str]:
        return {"nvidia-smi-query-gpu.csv": "index, name, uuid, driver_version, utilization.gpu [%]\n"
                                            f"0, NVIDIA H200, GPU-1, {driver}, {utilization} %\n"}

    first, _ = run_fake(tmp_path, fake_nvidia_smi(tmp_path, query(0)))
    busier, saved = run_fake(tmp_path, fake_nvidia_smi(tmp_path, query(97)))
    upgraded, _ = run_fake(tmp_path, fake_nvidia_smi(tmp_path, query(97, "595.80")))
    assert (first["changed"], busier["changed"], upgraded["changed"]) == (True, False, True)
    assert saved["observed"]["gpus"][0]["utilization.gpu"] == "0 %"  # the file keeps the earlier reading
