"""How the command-line tools log, and the one library notice they and the server leave out of their logs."""

from __future__ import annotations

import logging
import warnings

CLI_FORMAT = "%(asctime)s %(name)s %(message)s"


def quiet_codec_notice() -> None:
    """MONAI builds a DICOM reader for every image it loads and, where NVIDIA's nvImageCodec (a GPU decoder) is
    not installed, warns each time that it uses pydicom's decoders instead: a quarter of a server's log lines,
    and nothing for anyone to act on."""
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")


def configure_cli_logging() -> None:
    """INFO lines with time and source on stderr: how `segment`, `batch`, `evaluate`, `train` and the benches log."""
    logging.basicConfig(level=logging.INFO, format=CLI_FORMAT)
    quiet_codec_notice()
