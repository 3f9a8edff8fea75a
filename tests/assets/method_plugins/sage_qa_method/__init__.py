"""A third-party training method for the tests: supervised fine-tuning restricted to
question/answer records, with a statistics line and a metric of its own. It is one module
and one entry point (``sage_finetune.methods``), nothing else."""

from sage_finetune_plugin.methods.sft import SFT


class QAOnly(SFT):
    name = "qa-only"
    title = "supervised fine-tuning on qa records"
    description = "Test plugin: supervised fine-tuning on question/answer records only."
    formats = ("qa",)
    reads = "question/answer records"

    def stats_lines(self, stats):
        return [f"qa-only: {stats.samples} questions to learn"]

    def metrics(self, log_history):
        return {"qa_only_logged_steps": sum(1 for entry in log_history if "loss" in entry)}
