"""``bastion audit``: the adaptive evaluation of a network Bastion did not train.

    bastion audit --model examples/net.py:build --weights net.pt --dataset mnist -n 500 --eps 0.1,0.3
    bastion audit --model pkg.module:build --model-arg width=2 --key logits --data points.npz --eps 0.03
    bastion audit --model net.py:build --weights net.pt --data my_images/ --eps 0.03   # my_images/<class>/*.png
    bastion audit ... --data imagenet/val --channels 3 --resize 256 --crop 224 --num-workers 8 -n 5000

A folder is read with :func:`bastion.data.open_image_folder`: into memory when its float32
pixels take at most 256 MiB, batch by batch above that (``--stream on|off`` forces either; the
flags are those of :mod:`bastion.cli._folder`); ``-n`` then takes its first N points lazily.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from bastion.cli._args import floats, parse_assignments
from bastion.cli._folder import add_folder_options, folder_options, refuse_folder_options

if TYPE_CHECKING:
    from bastion.cli._args import Subparsers

NAME = "audit"


def add_parser(sub: Subparsers) -> None:
    s = sub.add_parser(NAME, help="evaluate your own model (adaptive protocol, checks, database, report)")
    s.add_argument("--model", required=True,
                   help="FILE.py:FACTORY, package.module:FACTORY, torchscript:PATH, timm:NAME or "
                   "hf:DIR (a Hugging Face image classifier saved locally)")
    s.add_argument("--model-arg", dest="model_arg", action="append", help="factory argument KEY=VALUE")
    s.add_argument("--weights", help="safetensors, or a state dict saved with torch.save (.pt/.pth; weights_only)")
    s.add_argument("--output", default="logits", help="what the model returns: logits, probabilities, binary-logit")
    s.add_argument("--key", help="where the logits are in the output: a dict key, an attribute or a tuple index")
    s.add_argument("--mean", help="per-channel normalisation the model expects, e.g. 0.1307 (applied inside; "
                   "default: what a timm/HF model declares, else none)")
    s.add_argument("--std", help="per-channel std to go with --mean")
    s.add_argument("--random", action="store_true", help="the model's forward pass is random (EOT, majority of k)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a registered dataset (see `bastion list datasets`)")
    src.add_argument("--data", help="a folder DIR/<class>/<image> (PNG, JPEG, ...; one size and mode unless --resize/"
                                    "--crop/--channels; read batch by batch when large, see --stream), or an .npz or "
                                    ".safetensors file with x (N,C,H,W in [0,1]) and y")
    s.add_argument("--split", default="test", help="split of --dataset")
    s.add_argument("-n", type=int, default=500, help="evaluate the first N points (default 500)")
    s.add_argument("--eps", required=True, help="budgets, comma-separated")
    s.add_argument("--attacks", default="fgsm,pgd", help="attacks besides AutoAttack (default fgsm,pgd)")
    s.add_argument("--norm", default="linf", help="linf or l2")
    s.add_argument("--queries", type=int, default=5, help="k: a random model must be right in a majority of k queries")
    s.add_argument("--no-autoattack", dest="autoattack", action="store_false", help="skip AutoAttack")
    s.add_argument("--autoattack-param", dest="autoattack_param", action="append",
                   help="AutoAttack hyper-parameter KEY=VALUE, e.g. n_queries=1000 (default: the paper's budget)")
    s.add_argument("--out", default="runs/audit", help="database and report directory")
    s.add_argument("--channels-last", dest="channels_last", action="store_true",
                   help="store the model's conv weights channels-last (faster conv/max-pool on CPU; see docs/audit.md)")
    add_folder_options(s)
    s.set_defaults(func=run)


def _key(text: str | None) -> str | int | None:
    return int(text) if text is not None and text.lstrip("-").isdigit() else text


def _model(args: argparse.Namespace, shape: tuple[int, int, int]) -> Any:
    from bastion.models import user

    module = user.load_module(args.model, **parse_assignments(args.model_arg or [], "--model-arg"))
    if args.weights:
        user.load_weights_file(module, args.weights)
    if (args.mean is None) != (args.std is None):
        from bastion.errors import ConfigError

        raise ConfigError("--mean and --std go together")
    mean = floats(args.mean, "--mean") if args.mean else None
    std = floats(args.std, "--std") if args.std else None
    if mean is None and (declared := user.declared_normalization(args.model, module)) is not None:
        mean, std = declared  # what a timm model or a Hugging Face image processor says it expects
    return user.wrap(module, input_shape=shape, output=args.output, key=_key(args.key), mean=mean, std=std,
                     random=args.random)


def run(args: argparse.Namespace) -> int:
    from bastion import data
    from bastion.eval.settings import EvaluationSection
    from bastion.harness.audit import audit

    if args.dataset:
        refuse_folder_options(args, f"--dataset {args.dataset}")
        ds = data.load(args.dataset, args.split)
    else:
        ds = data.from_path(args.data, **folder_options(args))
    ds = ds.take(args.n)
    model = _model(args, tuple(ds.x.shape[1:]))  # type: ignore[arg-type]
    st = EvaluationSection(protocols=["adaptive"], norm=args.norm, batch_size=250, queries=args.queries,
                           autoattack=args.autoattack,
                           autoattack_params=parse_assignments(args.autoattack_param or [], "--autoattack-param"))
    res = audit(model, ds, eps=floats(args.eps, "--eps"), norm=args.norm,
                attacks=[a.strip() for a in args.attacks.split(",") if a.strip()], out_dir=args.out, settings=st,
                channels_last=args.channels_last)
    print(res.table)
    raised = [f for f in res.flags if not f.passed]
    for f in raised:
        print(f"flag {f.flag}: {f.detail}")
    print(f"results database: {res.db_path}")
    if res.report is not None:
        print(f"report: {res.report[1]}  (markdown: {res.report[0]})")
    return 0
