"""The ``fx-lightning`` command: Lightning's CLI with the digits example as its default, and test after fit.

    fx-lightning fit --config configs/digits.yaml      # train, fuse, verify, export, then test fused
    fx-lightning fit --config configs/digits.yaml --print_config
    fx-lightning test --config configs/digits.yaml --ckpt_path path/to/best.ckpt

Models and data modules are chosen with ``class_path`` (subclass mode): any LightningModule and
LightningDataModule importable by Python work, ``fx_lightning.examples.models.DigitsCNN`` and
``fx_lightning.examples.data.DigitsDataModule`` are the defaults.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI


class FxLightningCLI(LightningCLI):
    """``LightningCLI`` that defaults to the digits example and, after ``fit``, tests the best checkpoint.

    The ``--test_after_fit`` flag (on by default) makes ``fx-lightning fit`` one command for the whole job:
    with :class:`fx_lightning.FuseOnExport` among the callbacks, training ends with a fused copy of the network
    verified and exported (the model itself keeps its own network), and the test that follows runs with the best
    checkpoint's weights, fused for the test loop.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--test_after_fit`` and the default model and data classes."""
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, run `test` on the best checkpoint (or the final weights without checkpointing).",
        )
        parser.set_defaults(
            {
                "model": {"class_path": "fx_lightning.examples.models.DigitsCNN"},
                "data": {"class_path": "fx_lightning.examples.data.DigitsDataModule"},
            }
        )

    def after_fit(self) -> None:
        """Test after ``fit`` when ``--test_after_fit`` is set (the default) and the run was not interrupted."""
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        if not config.get("test_after_fit", True) or self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)


def run(args: list[str] | None = None) -> FxLightningCLI:
    """Run the ``fx-lightning`` command and return the CLI object (useful in tests and notebooks).

    Args:
        args: command-line arguments; ``None`` reads ``sys.argv``.

    Returns:
        The :class:`FxLightningCLI` instance, with its ``trainer``, ``model`` and ``datamodule``.
    """
    return FxLightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main() -> None:
    """The ``fx-lightning`` console script: runs :func:`run` on ``sys.argv`` and exits 0 when it succeeds.

    (A console script exits with whatever ``main`` returns, so this returns nothing.)
    """
    run()


if __name__ == "__main__":
    main()
