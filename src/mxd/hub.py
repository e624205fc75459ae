"""The Hugging Face Hub: runs by "hf:OWNER/REPO[@REVISION]", downloaded through huggingface_hub
(HF_HUB_OFFLINE=1 reads the local Hub cache only), and folders uploaded to it (`mxd push`, see
mxd.share for what a pushed run holds).
"""

from __future__ import annotations

from pathlib import Path

HF_PREFIX = "hf:"


def parse_hub_path(path: str) -> tuple[str, str | None]:
    """("OWNER/REPO", revision or None) of "hf:OWNER/REPO[@REVISION]"; ValueError naming the form."""
    repo, _, revision = path.removeprefix(HF_PREFIX).partition("@")
    if path.startswith(HF_PREFIX) and repo.count("/") == 1 and all(repo.split("/")) and (revision or "@" not in path):
        return repo, revision or None
    raise ValueError(f"{path!r} is not a Hub path: use hf:OWNER/REPO or hf:OWNER/REPO@REVISION")


def run_folder(path: str | Path) -> Path:
    """A local folder for `path`: itself, or for "hf:OWNER/REPO[@REV]" the downloaded snapshot."""
    if not str(path).startswith(HF_PREFIX):
        return Path(path).expanduser()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = parse_hub_path(str(path))
    try:
        return Path(snapshot_download(repo, revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ValueError(f"cannot download {path}: {str(e).splitlines()[0]}") from None


def upload(folder: Path, repo_id: str, message: str, private: bool = False, token: str | None = None) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created if missing); the commit URL."""
    from huggingface_hub import HfApi

    parse_hub_path(HF_PREFIX + repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=message))
