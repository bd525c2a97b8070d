# ruff: noqa: UP031, B007  (ReferencePruner is kept as the reference wrote it)
"""Replay a short training run against the reference LoSparse pruner and get the same masks at every step.

`ReferencePruner` below is a line-by-line copy (quotes normalised by `ruff format`) of the scoring and masking
code of the `Pruner` class in (commit 7513452, 2023-10-17)
https://github.com/yxli2123/LoSparse/blob/7513452313f85611d356db064e4279062b5a73b9/utils.py:
`__init__` (the fields these methods use), `whether_mask_para`, `structured_prune` (the 'row'
direction, which LoSparse uses), `schedule_threshold_comb`, `update_ipt_with_local_window`, `mask_with_threshold`
and `update_and_pruning`. The only addition is one marked line that keeps `is_dict` so the test can read the mask.
Its training loop calls `pruner.update_and_pruning(model, completed_steps)` after `optimizer.step()` with
`completed_steps` counted from 0 (`run_glue.py`), which is what the loop here does.

Two copies of one tiny model train in lockstep on the same batches with the same optimizer: one pruned by
`LoSparseCallback`, one by the reference. If every mask agrees, the two models stay bit-identical (pruned rows are
zeroed but regrow between mask steps in both), so the replay checks the whole trajectory, not only one decision.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from optimum_oats.training.losparse import LoSparseCallback, LoSparseConfig, apply_losparse, losparse_layers
from tests.helpers.tiny_models import build_tiny_model


class ReferencePruner:
    def __init__(self, model, args, total_step, tb_writer=None,
                 mask_param_name=None,
                 non_mask_name=None,
                 use_no_mask=False,
                 pruner_name='PLATON',
                 structured_method='mean',
                 structured_direction='row'):  # fmt: skip

        if non_mask_name is None:
            non_mask_name = ["embedding", "norm"]
        if mask_param_name is None:
            mask_param_name = ["sparse"]
        self.model = model
        self.config = vars(args)
        self.args = args
        self.ipt = {}
        self.exp_avg_ipt = {}
        self.exp_avg_unc = {}
        self.mask_param_name = mask_param_name
        self.non_mask_name = non_mask_name
        self.use_no_mask = use_no_mask
        self.total_step = total_step
        self.tb_writer = tb_writer
        self.pruner_name = pruner_name
        self.beta1 = self.config["beta1"]
        self.beta2 = self.config["beta2"]
        self.deltaT = self.config["deltaT"]
        self.structured_method = structured_method
        self.structured_direction = structured_direction

    def whether_mask_para(self, n):
        if not self.use_no_mask:
            return any(nd in n for nd in self.mask_param_name)
        else:
            return not any([nd in n for nd in self.non_mask_name])

    def structured_prune(self, is_dict_mat, name):
        num_row, num_col = is_dict_mat.shape
        if self.structured_direction == "row":
            if self.structured_method == "mean":
                return torch.mean(is_dict_mat, dim=1, keepdim=True).repeat((1, num_col))
            elif self.structured_method == "sum":
                return torch.sum(is_dict_mat, dim=1, keepdim=True).repeat((1, num_col))
            elif self.structured_method == "max":
                return torch.max(is_dict_mat, dim=1, keepdim=True).repeat((1, num_col))
            elif self.structured_method == "min":
                return torch.min(is_dict_mat, dim=1, keepdim=True).repeat((1, num_col))
            else:
                raise ValueError("Unimplemented Sturctured Method: %s" % self.structured_method)
        else:
            raise ValueError("Unimplemented Sturctured Direction: %s" % self.structured_direction)

    def schedule_threshold_comb(self, step: int):
        # Schedule the remaining ratio
        args = self.args  # noqa: F841
        total_step = self.total_step
        initial_threshold = self.config["initial_threshold"]
        final_threshold = self.config["final_threshold"]
        initial_warmup = self.config["initial_warmup"]
        final_warmup = self.config["final_warmup"]
        warmup_steps = self.config["warmup_steps"]
        mask_ind = False
        if step <= initial_warmup * warmup_steps:
            threshold = initial_threshold
            mask_ind = False
        elif step > (total_step - final_warmup * warmup_steps):
            threshold = final_threshold
            mask_ind = True
        else:
            spars_warmup_steps = initial_warmup * warmup_steps
            spars_schedu_steps = (final_warmup + initial_warmup) * warmup_steps
            mul_coeff = 1 - (step - spars_warmup_steps) / (total_step - spars_schedu_steps)
            threshold = final_threshold + (initial_threshold - final_threshold) * (mul_coeff**3)
            mask_ind = True if step % self.deltaT == 0 else False
        return threshold, mask_ind

    def update_ipt_with_local_window(self, model, global_step):
        # Calculate the sensitivity and uncertainty
        for n, p in model.named_parameters():
            if self.whether_mask_para(n):
                if n not in self.exp_avg_ipt:
                    self.exp_avg_ipt[n] = torch.zeros_like(p)
                    self.ipt[n] = torch.zeros_like(p)
                    if self.beta2 > 0 and self.beta2 != 1:
                        self.exp_avg_unc[n] = torch.zeros_like(p)
                if self.pruner_name == "Magnitude":
                    # Calculate the score of magnitude pruning
                    self.ipt[n] = p.abs().detach()
                elif self.pruner_name == "PLATON":
                    local_step = global_step % self.deltaT
                    update_step = global_step // self.deltaT
                    if local_step == 0:
                        self.exp_avg_ipt[n] = self.beta1 * self.exp_avg_ipt[n] + (1 - self.beta1) * self.ipt[n]
                        if 0 < self.beta2 < 1:
                            self.exp_avg_unc[n] = (
                                self.beta2 * self.exp_avg_unc[n]
                                + (1 - self.beta2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs()
                            )
                        elif self.beta2 == 2.0:
                            self.exp_avg_unc[n] = (
                                update_step * self.exp_avg_unc[n] + (self.ipt[n] - self.exp_avg_ipt[n]) ** 2
                            ) / (update_step + 1)
                        self.ipt[n] = (p * p.grad).abs().detach()
                    else:
                        self.ipt[n] = (self.ipt[n] * local_step + (p * p.grad).abs().detach()) / (local_step + 1)
                else:
                    raise ValueError("Incorrect Pruner Name.")  # fmt: skip

    def mask_with_threshold(self, model, threshold):
        # Calculate the final importance score
        is_dict = {}
        for n, p in model.named_parameters():
            if self.whether_mask_para(n):
                if self.pruner_name == "Magnitude":
                    is_dict[n] = self.ipt[n]
                elif self.pruner_name == "PLATON":
                    if 0 < self.beta2 < 1:
                        is_dict[n] = self.exp_avg_ipt[n] * self.exp_avg_unc[n]
                    elif self.beta2 == 1.0:
                        is_dict[n] = self.exp_avg_ipt[n]
                    elif self.beta2 == 2.0:
                        is_dict[n] = self.exp_avg_ipt[n] * self.exp_avg_unc.sqrt()
                    else:
                        # Handling the unaccepted beta2 to default setting
                        is_dict[n] = self.exp_avg_ipt[n] * (self.ipt[n] - self.exp_avg_ipt[n]).abs()
                else:
                    raise ValueError("Incorrect Pruner Name.")
                if self.structured_method is not None and len(is_dict[n].shape) == 2:
                    is_dict[n] = self.structured_prune(is_dict[n], n)
        # Calculate the mask threshold
        all_is = torch.cat([is_dict[n].view(-1) for n in is_dict])
        mask_threshold = torch.kthvalue(all_is, int(all_is.shape[0] * (1 - threshold)))[0].item()
        # Mask weights whose importance lower than threshold
        for n, p in model.named_parameters():
            if self.whether_mask_para(n):
                p.data.masked_fill_(is_dict[n] < mask_threshold, 0.0)
        self.last_is_dict = is_dict  # ADDED for the test: the scores behind this mask
        return mask_threshold

    def update_and_pruning(self, model, global_step):
        # Update importance score after optimizer stepping
        self.update_ipt_with_local_window(model, global_step)
        # Get the remaining ratio
        threshold, mask_ind = self.schedule_threshold_comb(global_step)
        if mask_ind:
            # Mask weights during masking horizon
            mask_threshold = self.mask_with_threshold(model, threshold)
        else:
            mask_threshold = None
        return threshold, mask_threshold


STEPS, T_I, T_F, DELTA_T, FINAL = 36, 4, 8, 3, 0.3


@pytest.mark.parametrize("beta2", [1.0, 0.7])  # LoSparse's default (no uncertainty) and PLATON's uncertainty term
def test_masks_match_the_reference_at_every_pruning_step(tiny_configs, beta2):
    torch.manual_seed(0)
    ours = build_tiny_model(tiny_configs["llama"])
    config = LoSparseConfig(
        low_rank_ratio=0.1,
        final_remaining_ratio=FINAL,
        total_steps=STEPS,
        initial_warmup_steps=T_I,
        final_warmup_steps=T_F,
        delta_t=DELTA_T,
        beta2=beta2,
    )
    apply_losparse(ours, config)
    theirs = copy.deepcopy(ours)
    names = list(losparse_layers(ours))
    args = SimpleNamespace(
        beta1=0.85, beta2=beta2, deltaT=DELTA_T, initial_threshold=1.0, final_threshold=FINAL,
        initial_warmup=T_I, final_warmup=T_F, warmup_steps=1,
    )  # fmt: skip
    pruner = ReferencePruner(theirs, args, STEPS, mask_param_name=[f"{n}.weight" for n in names])
    callback = LoSparseCallback(config)
    callback._total_steps, callback._phases = STEPS, (T_I, T_F)  # what on_train_begin sets from the Trainer
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01) for m in (ours, theirs)]
    vocab = tiny_configs["llama"].vocab_size

    mask_steps, regrown, previous = [], 0, None
    for step in range(STEPS):
        ids = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(step))
        for model, optimizer in zip((ours, theirs), optimizers, strict=True):
            model(ids, labels=ids).loss.backward()
            optimizer.step()
        masked = callback.update(ours, step)
        _, mask_threshold = pruner.update_and_pruning(theirs, step)
        assert masked == (mask_threshold is not None), step
        if masked:
            mask_steps.append(step)
            current = {}
            for name in names:
                reference_keep = ~(pruner.last_is_dict[f"{name}.weight"] < mask_threshold)[:, 0]
                assert torch.equal(losparse_layers(ours)[name].row_mask, reference_keep), (step, name)
                current[name] = reference_keep
            if previous is not None:
                regrown += sum(int((current[n] & ~previous[n]).sum()) for n in names)
            previous = current
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert torch.equal(a, b), (step, name)  # same masks, same updates: the trajectories stay identical
        for optimizer in optimizers:
            optimizer.zero_grad()

    decay_mask_steps = [s for s in range(T_I + 1, STEPS - T_F + 1) if s % DELTA_T == 0]
    assert mask_steps == decay_mask_steps + list(range(STEPS - T_F + 1, STEPS))
    assert callback.ratio == pytest.approx(FINAL, abs=0.05)
    assert regrown > 0  # some pruned rows came back at a later selection, in both implementations
