import subprocess
import sys

from spark3d.cli import main


def test_check_backbone_reports_pass_for_timm(capsys):
    code = main(["check-backbone", "resnet18", "--spatial-dims", "2", "--in-channels", "1", "--size", "64"])
    out = capsys.readouterr().out
    assert code == 0
    assert "no leak         PASS" in out and "dense-equal     PASS" in out
    assert "[(4, 4), (8, 8), (16, 16), (32, 32)]" in out  # MONAI ResNet (FlexibleUNet encoder) in 2D


def test_check_backbone_clear_error_for_bad_size(capsys):
    code = main(["check-backbone", "timm/resnet18", "--size", "48"])
    err = capsys.readouterr().err
    assert code == 2 and "not divisible" in err and "Traceback" not in err


def test_console_script_help_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "spark3d.cli"], capture_output=True, text=True)
    assert out.returncode == 2 and "check-backbone" in out.stdout
    out = subprocess.run([sys.executable, "-m", "spark3d.cli", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr
