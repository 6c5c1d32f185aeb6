"""The audit: the selected mask against full fine-tuning, each PEFT method unmasked and the known
mitigations (alone and stacked on the mask), every arm with the same data, steps, seeds and metrics
as the final model, plus an extraction attack per model. Also the transfer experiment.

- `arms`: arm names -> masks and mitigation hooks; one arm and seed, all arms x seeds;
- `attack`: the extraction attack on one fine-tuned arm and its calibrated link threshold;
- `statistics`: mean and spread over seeds, the arms' trade-off, the paper's claims checked;
- `render`: figures, Markdown and self-contained HTML;
- `run`: the audit (`run_audit`) and the report of any set of arms;
- `transfer`: the saved mask on a second dataset (`run_transfer`).
"""
