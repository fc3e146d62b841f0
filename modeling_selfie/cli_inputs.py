"""What `selfie-segment` reads, checked before torch loads: images, prompts, the batch file, the model and the output
paths. Imports no torch (the command's parser, `selfie_segment.py`, uses it to answer at once; `cli.py`, which does
the work, uses it again once the model is there).

Each `*_problem` function returns why its input cannot be used, as one line (`None` when it can).
"""

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from PIL import UnidentifiedImageError

from .errors import UsageError
from .io_utils import ImageTooLargeError, open_image
from .queries import normalize_query, shorten

DEFAULT_MODEL = "selfie-refshapes"
HUB_TIMEOUT = 10  # seconds to wait for the Hub's answer about a model that is not in the local cache


CLIError = UsageError  # a user-facing error: printed as one `error:` line, exit code 2


@dataclass
class Job:
    """One image + prompt to segment; `line` is its line in a `--batch` file (`None` on the command line)."""

    image: Path
    prompt: str
    line: int | None = None
    name: str | None = None  # the image as the user wrote it


def default_model_dir() -> Path:
    """Folder of the model shipped in the package."""
    return Path(str(resources.files("modeling_selfie").joinpath("pretrained", DEFAULT_MODEL)))


def image_problem(path: str | Path) -> str | None:
    """Why `path` cannot be an image to read: missing, a folder, not an image Pillow knows, or too large
    (`io_utils.open_image`'s limit). Only the file's header is read."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder, not an image"
    if not path.is_file():
        return f"image not found: {path}"
    try:
        open_image(path).close()
    except (ImageTooLargeError, OSError) as error:
        return read_error(path, error)
    return None


def read_error(path: str | Path, error: Exception) -> str:
    """One line saying why `io_utils.read_image(path)` raised `error`."""
    if isinstance(error, ImageTooLargeError):
        return str(error)
    if isinstance(error, UnidentifiedImageError):
        return f"cannot read image {path}: not an image file Pillow knows (PNG, JPEG, GIF, WebP, TIFF, BMP, ...)"
    return f"cannot read image {path}: {getattr(error, 'strerror', None) or error}"


def prompt_problem(prompt, normalization: str | None = None, kind: str = "phrase") -> str | None:
    """Why `prompt` cannot be segmented: not a string, empty, or (for a model whose processor writes queries as
    words, `query_normalization="words"`) without a word."""
    if not isinstance(prompt, str):
        return f"the prompt {shorten(repr(prompt))} is not text: write it in quotes, e.g. \"red circle\""
    if not prompt.strip():
        return f"the prompt {prompt!r} is empty: say what to segment, e.g. \"red circle\""
    try:
        normalize_query(prompt, kind, normalization)
    except ValueError:
        return (f"the prompt {shorten(prompt)!r} holds no word (letters or digits) for this model to read: say what "
                "to segment, e.g. \"red circle\"")
    return None


def query_normalization(model_folder: str | Path | None) -> str | None:
    """The `query_normalization` a model folder's processor was saved with (`None` when it has none, or the folder
    is not here: a Hub id)."""
    if model_folder is None or not Path(model_folder).is_dir():
        return None
    try:
        saved = json.loads((Path(model_folder) / "processor_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved.get("query_normalization") if isinstance(saved, dict) else None


def locate_model(name_or_path: str | Path | None) -> str:
    """Where the model loads from: a local folder (the shipped model when `None`; a Hub id already in the local
    cache: its cached folder, read without the network), or a Hub id that the Hub has. Raises `CLIError` at once
    when it can be neither: a path that is not a model folder, or a Hub id that is not cached while huggingface_hub
    is offline (`HF_HUB_OFFLINE=1`), that the Hub does not know, or that cannot be asked about (no network: one try,
    `HUB_TIMEOUT` seconds)."""
    if name_or_path is None:
        if not (default_model_dir() / "config.json").is_file():
            raise CLIError(f"the shipped model is missing from {default_model_dir()}; reinstall modeling-selfie")
        return str(default_model_dir())
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CLIError(f"{name} is not a model folder (no config.json)")
        return str(path)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise CLIError(f"model folder not found: {name}") from None
    try:
        return snapshot_download(name, local_files_only=True)
    except (OSError, ValueError):  # not in the cache
        pass
    here = f"no folder {name} here, and the Hub model {name} is not in the local cache"
    if constants.HF_HUB_OFFLINE:
        raise CLIError(f"{here}; HF_HUB_OFFLINE is set, so it cannot be downloaded")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        raise CLIError(f"{here}, and the Hub lets only approved users download it (log in: hf auth login)") from None
    except RepositoryNotFoundError:
        raise CLIError(f"{here}, and the Hub has no model {name} (or it is private: hf auth login)") from None
    except Exception as error:  # no network, a proxy, a timeout: the transport's errors differ between releases
        reason = str(error).strip().split("\n")[0][:120] or type(error).__name__
        raise CLIError(f"{here}, and the Hub cannot be reached ({reason})") from None
    return name


def batch_problem(path: str | Path) -> str | None:
    return None if Path(path).is_file() else f"batch file not found: {path}"


def read_batch_file(path: str | Path, normalization: str | None = None, kind: str = "phrase"):
    """The jobs of a JSON Lines file of `{"image", "prompt"}` objects (image paths relative to the file's folder),
    and one message per line that cannot be used (blank lines are skipped). Prompts are checked as
    [`prompt_problem`] checks them for a model with this `query_normalization`, images as [`image_problem`] does
    (their headers; they are decoded when their batch comes).

    Returns:
        `(jobs, problems)`: a list of [`Job`] and a list of `"FILE line N: why"` messages.
    """
    path = Path(path)
    if problem := batch_problem(path):
        raise CLIError(problem)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CLIError(f"cannot read batch file {path}: {error}") from error
    jobs, problems = [], []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except json.JSONDecodeError as error:
            problems.append(f"{path} line {number}: not JSON ({error})")
            continue
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or "prompt" not in item:
            problems.append(f'{path} line {number}: needs an object {{"image": PATH, "prompt": TEXT}}, got '
                            f"{shorten(text, 80)}")
            continue
        image = path.parent / item["image"]
        if problem := prompt_problem(item["prompt"], normalization, kind) or image_problem(image):
            problems.append(f"{path} line {number}: {problem}")
            continue
        jobs.append(Job(image, item["prompt"].strip(), number, item["image"]))
    return jobs, problems


def folder_problem(folder: str | Path) -> str | None:
    """Why files cannot be written in `folder`, creating it when missing (`None` when they can)."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so the folder {folder} cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write in {existing}: permission denied"
    return None


def output_problem(option: str, path: str, folder: bool) -> str | None:
    """Why `option PATH` cannot be written: `PATH` is a folder to write in when `folder`, else a file (or prefix)."""
    if not folder and Path(path).is_dir():
        return f"{option} {path} is a folder: name the file to write, e.g. {Path(path) / 'masks.json'}"
    problem = folder_problem(path if folder else Path(os.path.abspath(path)).parent)
    return f"{option} {path}: {problem}" if problem else None


def names_a_folder(output: str) -> bool:
    """Whether `--output` names a folder: an existing one, or any path ending in a separator."""
    return output.endswith(tuple(s for s in (os.sep, os.altsep) if s)) or Path(output).is_dir()
