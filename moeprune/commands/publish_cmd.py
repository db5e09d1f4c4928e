"""`moeprune publish`: write the model card and provenance of an output folder, optionally push it."""

from __future__ import annotations

import click


__all__ = ["publish_cmd"]


@click.command("publish")
@click.argument("out_dir")
@click.option("--repo-id", default=None, help="Hub repository (owner/name) to push to; omit to only write the card.")
@click.option("--private", is_flag=True, help="Create the hub repository as private.")
def publish_cmd(out_dir: str, repo_id: str | None, private: bool) -> None:
    """Rewrite OUT_DIR/README.md (model card) and moeprune.json; with --repo-id, upload the folder.

    Without a Hugging Face token nothing is pushed: one line says so and the command exits 0, the
    folder ready to upload. A push that fails is a one-line error (exit 2).
    """
    from pathlib import Path

    from moeprune.checkpoint.model_dir import check_links
    from moeprune.publish import publish_folder

    if Path(out_dir).is_dir():
        check_links(Path(out_dir), what="folder")  # an upload would send what a link points at
    outcome = publish_folder(out_dir, repo_id=repo_id, private=private)
    click.echo(outcome.message)
