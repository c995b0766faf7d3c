"""Evaluation protocols: every card in conf/protocol loads and composes; what a card pins cannot be changed from the
command line; GenEval's report by hand; a run evaluated under two protocols writes two results that name their
protocol, and experiments.compare refuses to put them side by side."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments import compare, protocols
from experiments import evaluate as ev
from pipelines.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CARDS = protocols.available()


def test_the_shipped_cards():
    assert set(CARDS) == {"geneval", "ocr", "pickscore", "drawbench"}


@pytest.mark.parametrize("name", CARDS)
def test_every_card_loads_and_composes(name):
    card = protocols.load_protocol(name)
    assert card.name == name and card.num_inference_steps == 40 and card.guidance_scale == 4.5
    assert card.resolution == 512 and card.negative_prompt == "" and card.rewards
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"+protocol={name}"])
    assert cfg.protocol.name == name
    for group in card.rewards:  # each reward of the card composes as evaluate composes it
        assert ev.compose_reward(group)._target_.startswith("rewards.")


def test_geneval_report_by_hand():
    card = protocols.load_protocol("geneval")
    assert card.images_per_prompt == 4 and card.rewards == [["reward=geneval", "reward.score=correct"]]
    assert len(ev.protocol_prompts(card, None)) == 553  # GenEval's prompts
    row = {f"eval/correct_{t}_mean": v
           for t, v in zip(protocols.GENEVAL_TASKS, (1.0, 0.5, 0.25, 0.75, 0.0, 0.5), strict=True)}
    summary = protocols.report(card, row)
    assert summary["geneval/counting"] == 0.25 and summary["geneval/overall"] == pytest.approx(3.0 / 6)
    assert "geneval/overall" not in protocols.report(card, {"eval/correct_counting_mean": 1.0})  # a task missing
    assert protocols.report(protocols.load_protocol("ocr"), row) == {}


def test_what_a_card_pins_is_refused_in_one_line():
    card = protocols.load_protocol("geneval")
    with pytest.raises(UserError, match=r"--steps changes what protocol=geneval pins \(num_inference_steps: 40\)"):
        protocols.pinned_options(card, {"--steps": 10})
    with pytest.raises(UserError, match="--prompts-file changes what protocol=geneval pins"):
        ev.protocol_prompts(card, "mine.txt")
    with pytest.raises(UserError, match="protocol=pickscore needs its prompt set"):
        ev.protocol_prompts(protocols.load_protocol("pickscore"), None)
    with pytest.raises(UserError, match="pins its rewards"):
        ev.protocol_rewards(card, ["reward=aesthetic"])
    with pytest.raises(UserError, match="unknown protocol 'genevall'"):
        protocols.load_protocol("genevall")
    with pytest.raises(UserError, match="give one protocol"):
        protocols.split_protocol(["protocol=ocr", "protocol=geneval"])
    with pytest.raises(UserError, match="reward.score changes what protocol=geneval pins"):
        ev.protocol_rewards(card, ["reward.score=partial"])
    # the first reward's weights can be pointed elsewhere, and that is recorded
    (reward,) = ev.protocol_rewards(card, ["reward.detector=/weights/mask2former"])
    assert reward.name == "geneval" and reward.config.detector == "/weights/mask2former"
    assert reward.config.score == "correct"


SMALL = {
    "small_jpeg": {"images_per_prompt": 1, "rewards": [["reward=jpeg_compressibility"]]},
    "small_two": {"images_per_prompt": 2, "rewards": [["reward=jpeg_incompressibility"]]},
}


@pytest.fixture
def small_cards(tmp_path, monkeypatch):
    """Two protocols small enough for the tiny model, read by the same code as the shipped cards."""
    folder = tmp_path / "protocol"
    folder.mkdir()
    for name, card in SMALL.items():
        body = {"name": name, "prompts": {"file": "digits_world_eval.txt", "start": 0, "stop": 2, "unique": True},
                "num_inference_steps": 2, "guidance_scale": 4.5, "resolution": 32, "negative_prompt": "", "seed": 7,
                "report": "mean", **card}
        (folder / f"{name}.yaml").write_text(json.dumps(body))
    monkeypatch.setattr(protocols, "PROTOCOL_DIR", folder)


def test_two_protocols_write_two_results_that_compare_refuses_to_mix(small_cards, tmp_path, capsys):
    from test_experiments import GRPO, train

    run = train(tmp_path / "run", GRPO)
    for name in SMALL:
        ev.main([str(run), f"protocol={name}", "--checkpoint", "2"])
    tables = {name: json.loads((run / "evaluation" / name / "table.json").read_text()) for name in SMALL}
    assert {name: t["protocol"] for name, t in tables.items()} == {name: name for name in SMALL}
    jpeg, two = tables["small_jpeg"], tables["small_two"]
    assert jpeg["settings"]["seed"] == 7 and two["settings"]["eval"]["images_per_prompt"] == 2
    assert [r["images"] for r in jpeg["rows"]] == [2] and [r["images"] for r in two["rows"]] == [4]
    assert tables["small_jpeg"]["rows"][0]["eval/reward_mean"] < 0 < tables["small_two"]["rows"][0]["eval/reward_mean"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # one run under two protocols
        compare.main([str(run / "evaluation" / "small_jpeg"), str(run / "evaluation" / "small_two")])
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: these evaluations used different protocols (small_jpeg:")
    assert message.count("\n") == 1
    other = train(tmp_path / "other", [*GRPO, "seed=1"])  # two runs, each under its own protocol
    ev.main([str(other), "protocol=small_two", "--checkpoint", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        compare.main([str(run / "evaluation" / "small_jpeg"), str(other / "evaluation" / "small_two")])
    assert capsys.readouterr().err.startswith("error: these evaluations used different protocols")
    summaries = compare.main([str(run / "evaluation" / "small_two"), str(other / "evaluation" / "small_two"),
                              "--out", str(tmp_path / "cmp.png")])  # one protocol: compared
    assert sum(len(s["runs"]) for s in summaries) == 2
    with pytest.raises(SystemExit):
        ev.main([str(run), "protocol=small_jpeg", "--checkpoint", "2", "--steps", "3"])
    assert "--steps changes what protocol=small_jpeg pins" in capsys.readouterr().err
