"""The Hub settings of a run (where its export is pushed), and their checks."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .checks import fail

if TYPE_CHECKING:
    from .training_arguments import DinoTrainingArguments


# Never saved with the resolved settings.
SECRET_FIELDS = ("hub_token",)


@dataclass
class HubArguments:
    """Pushing the export to the Hugging Face Hub."""

    push_to_hub: bool = field(default=False, metadata={"help": "Upload the teacher export at every checkpoint."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository, e.g. org/dino-vits16."})
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token (default: the logged-in one). Never saved."}
    )
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the repository as private."})


def check_hub(args: "DinoTrainingArguments") -> None:
    """A repository to push to."""
    if args.push_to_hub and not args.hub_model_id:
        fail("hub_model_id", None, "a repository id such as org/dino-vits16 (required by --push_to_hub)")


__all__ = ["HubArguments", "SECRET_FIELDS", "check_hub"]
