"""mmfuse.world: seeded scenes, exact parsing, the language, and metrics on hand-made cases."""
import numpy as np
import pytest

from mmfuse.errors import ImageError, VocabularyError
from mmfuse.world.language import (QUESTION_TYPES, VOCABULARY, caption, parse_caption, questions,
                                   relation_holds, scene_from_caption)
from mmfuse.world.metrics import (accuracy, caption_counts, caption_metrics, parse_matches, recall_at_1,
                                  vqa_accuracy)
from mmfuse.world.parse import parse_image
from mmfuse.world.scene import BACKGROUND, PALETTE, Obj, Scene, generate_scene, render


def test_same_seed_same_scene_and_pixels_different_seeds_differ():
    assert generate_scene(7) == generate_scene(7)
    assert np.array_equal(render(generate_scene(7)), render(generate_scene(7)))
    assert len({caption(generate_scene(s)) for s in range(50)}) > 40


def test_parser_recovers_every_rendered_scene():
    for seed in range(400):
        scene = generate_scene(seed)
        assert parse_image(render(scene)) == scene.objects, seed


def test_hand_made_scene_renders_and_parses():
    scene = Scene((Obj(0, "large", "red", "circle"), Obj(3, "small", "blue", "triangle")), ((16, 16), (20, 12)))
    img = render(scene)
    assert tuple(img[16, 16]) == PALETTE["red"]                 # centre of the circle
    assert tuple(img[40, 40]) == BACKGROUND                     # empty cell
    assert tuple(img[32 + 19, 32 + 12]) == PALETTE["blue"]
    assert parse_image(img) == scene.objects
    assert caption(scene) == "a large red circle at the top left and a small blue triangle at the bottom right"
    assert scene_from_caption(caption(scene)).objects == scene.objects


def test_parser_tolerates_noise_but_sees_changed_objects():
    scene = generate_scene(3)
    img = render(scene).astype(np.int16) + np.random.default_rng(0).integers(-20, 21, (64, 64, 3))
    assert parse_image(np.clip(img, 0, 255).astype(np.uint8)) == scene.objects
    blank = np.full((64, 64, 3), BACKGROUND, np.uint8)
    assert parse_image(blank) == ()
    with pytest.raises(ImageError, match="shape"):
        parse_image(np.zeros((32, 32, 3), np.uint8))


def test_questions_have_true_answers():
    scene = Scene((Obj(0, "large", "red", "circle"), Obj(1, "small", "red", "square"), Obj(2, "large", "green", "circle")))
    seen = set()
    for seed in range(60):
        for qa in questions(scene, seed):
            seen.add(qa.kind)
            VOCABULARY.check(qa.question)
            VOCABULARY.check(qa.answer)
            q, a = qa.question, qa.answer
            if q == "how many objects are there":
                assert a == "three"
            elif q == "how many red objects are there":
                assert a == "two"
            elif q == "how many circles are there":
                assert a == "two"
            elif q == "what colour is the object at the top right":
                assert a == "red"
            elif q == "what shape is the object at the bottom left":
                assert a == "circle"
            elif q == "where is the small red square":
                assert a == "top right"
            elif q == "is the large red circle above the large green circle":
                assert a == "yes"
            elif q == "is the small red square left of the large red circle":
                assert a == "no"
            elif q == "is there a green square":
                assert a == "no"
            elif q == "is there a green circle":
                assert a == "yes"
    assert seen == set(QUESTION_TYPES)
    a, b = Obj(0, "small", "red", "circle"), Obj(3, "small", "red", "square")
    assert relation_holds(a, "above", b) and relation_holds(a, "left of", b)
    assert not relation_holds(a, "below", b) and not relation_holds(b, "left of", a)


def test_questions_are_not_tied_to_the_scene_generators_draws():
    """Every kind of count question is asked of scenes of every size, and yes/no answers are balanced
    within each size (sharing the scene's random stream once tied both to the number of objects)."""
    kinds, yes = {}, {}
    for s in range(2000, 2600):
        scene = generate_scene(s)
        n = len(scene.objects)
        qas = questions(scene, s)
        count = next(q for q in qas if q.kind == "count").question
        kinds.setdefault(n, set()).add("total" if count == "how many objects are there" else count.split()[2])
        for q in qas:
            if q.kind == "existence":
                yes.setdefault(n, []).append(q.answer == "yes")
    assert all(len(k) >= 4 for k in kinds.values()), kinds  # the total count and several colours / shapes
    assert all(0.3 < np.mean(v) < 0.7 for v in yes.values()), {n: np.mean(v) for n, v in yes.items()}


def test_training_draws_new_questions_each_epoch(monkeypatch):
    """draw 0 is the held-out evaluation's set; other draws ask the same scene other questions, and
    the training batches use a new draw each epoch (same questions every epoch left the yes/no types
    at chance)."""
    import torch

    import mmfuse.world.train as train

    scene = generate_scene(7)
    sets = [tuple(questions(scene, 7, draw)) for draw in range(6)]
    assert sets[0] == tuple(questions(scene, 7)) and sets[0] == tuple(questions(scene, 7, 0))
    assert len(set(sets)) > 3
    assert questions(scene, 7, 3) == questions(scene, 7, 3)
    seen = []
    real = train.scene_turns
    cfg = train.WorldTrainConfig(train_scenes=2, vlm_batch=2)
    monkeypatch.setattr(train, "scene_turns",
                        lambda seed, rng, draw=0, *extra: seen.append(draw) or real(seed, rng, draw, *extra))
    batches = train.vlm_batches(cfg, train.chat_tokenizer(), 4, torch.zeros(2, 3, 64, 64))
    for _ in range(3):
        next(batches)
    monkeypatch.undo()
    assert seen == [0, 0, 1, 1, 2, 2]
    plain = len(train.scene_turns(3, np.random.default_rng(0), 1))
    turns = train.scene_turns(3, np.random.default_rng(0), 1, 2, ("relation",))
    relations = [q for q, _ in turns if q.startswith("is the ")]
    assert len(turns) == plain + 2 and len(set(relations)) >= 2
    turns = train.scene_turns(3, np.random.default_rng(0), 1, 2, ("relation", "position"))
    assert len(turns) == plain + 4 and sum(q.startswith("where is") for q, _ in turns) == 3


def test_vocabulary_errors_name_the_words():
    with pytest.raises(VocabularyError, match="banana"):
        VOCABULARY.check("a large banana at the top left")
    with pytest.raises(VocabularyError, match="clause"):
        scene_from_caption("a red circle at the top left")
    with pytest.raises(VocabularyError, match="two objects"):
        scene_from_caption("a large red circle at the top left and a small red circle at the top left")
    with pytest.raises(VocabularyError):
        VOCABULARY.check("")


def test_vqa_accuracy_per_type():
    out = vqa_accuracy([("count", "two", "two"), ("count", "one", "two"), ("colour", " Red ", "red")])
    assert out["by_type"] == {"count": 0.5, "colour": 1.0}
    assert out["overall"] == pytest.approx(2 / 3) and out["n"] == 3


def test_caption_metrics_count_false_attributes_and_missed_objects():
    scene = Scene((Obj(0, "large", "red", "circle"), Obj(3, "small", "blue", "triangle")))
    assert caption_counts(caption(scene), scene) == (8, 8, 2, 2)
    # wrong colour on the first object, second object missing, an object invented at the top right
    text = "a large green circle at the top left and a small red square at the top right"
    assert caption_counts(text, scene) == (3, 8, 1, 2)
    out = caption_metrics([(text, scene), (caption(scene), scene)])
    assert out["attribute_precision"] == pytest.approx(11 / 16) and out["object_recall"] == pytest.approx(3 / 4)
    assert parse_caption("a large red blob at the top left") == [{"size": "large", "colour": "red", "position": "top left"}]


def test_recall_at_1_and_accuracy():
    sim = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.7], [0.3, 0.3, 0.3]])
    assert recall_at_1(sim, [0, 2, 2]) == pytest.approx(2 / 3)  # the tie in row 3 is a miss
    assert recall_at_1(sim, [1, 0, 0]) == 0.0
    assert accuracy(["a", "b", "c"], ["a", "x", "c"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])


def test_parse_match_of_generated_images():
    scenes = [generate_scene(s) for s in range(3)]
    images = [render(s) for s in scenes]
    caps = [caption(s) for s in scenes]
    assert parse_matches(images, caps) == [True, True, True]
    assert parse_matches(images[::-1], caps) == [a == b for a, b in zip(scenes[::-1], scenes)]
