"""The procedural portrait world: identities, attributes, captions, landmarks, splits and preferences."""

import numpy as np
import pytest
import transformers

from alignax.world import data as world_data
from alignax.world import portraits as P
from alignax.world import tokenizer as world_tokenizer

ATTRS = dict(expression="neutral", glasses="none", hat="none", hair="short", light="front", background="grey")


@pytest.fixture(scope="module")
def small_world():
    return world_data.generate(3, size=32, num_identities=6, num_train=48, num_eval=12, num_pairs=40,
                               faces_per_identity=4, references_per_identity=2)


def test_generation_is_a_function_of_the_seed(small_world):
    again = world_data.generate(3, size=32, num_identities=6, num_train=48, num_eval=12, num_pairs=40,
                                faces_per_identity=4, references_per_identity=2)
    np.testing.assert_array_equal(again.train.images, small_world.train.images)
    np.testing.assert_array_equal(again.eval_pairs.image_1, small_world.eval_pairs.image_1)
    assert again.train.captions == small_world.train.captions
    other = world_data.generate(4, size=32, num_identities=6, num_train=48, num_eval=12, num_pairs=40,
                                faces_per_identity=4, references_per_identity=2)
    assert not np.array_equal(other.train.images, small_world.train.images)


def test_identities_differ_and_the_ideal_face_erases_the_geometry():
    people = P.make_identities(16)
    renders = np.stack([P.render(p, ATTRS, size=64).astype(np.float32) for p in people])
    distances = np.abs(renders[:, None] - renders[None]).mean(axis=(2, 3, 4))
    assert distances[~np.eye(16, dtype=bool)].min() > 2.0  # every pair of faces differs visibly
    # Two identities with the same hair and skin: at ideal=1 the shared ideal geometry leaves only the eye colour.
    a, b = people[0], people[8]
    assert (a.hair, a.skin) == (b.hair, b.skin)
    ideal = np.abs(P.render(a, ATTRS, ideal=1.0).astype(int) - P.render(b, ATTRS, ideal=1.0)).mean()
    own = np.abs(P.render(a, ATTRS).astype(int) - P.render(b, ATTRS)).mean()
    assert ideal < 0.2 * own, (ideal, own)


def test_landmarks_land_on_the_drawn_features():
    person = P.make_identities(4)[2]
    rng = np.random.default_rng(0)
    for _ in range(5):
        pose = P.Pose.random(rng)
        image = P.render(person, ATTRS, pose, size=128)
        points = P.landmarks(person, pose, 128)
        for eye in points[:2]:  # the iris colour sits at each eye landmark
            x, y = np.round(eye).astype(int)
            assert np.abs(image[y, x].astype(int) - person.eyes).max() < 40, (image[y, x], person.eyes)
        x, y = np.round(points[3:].mean(0)).astype(int)  # the mouth line between the corners (neutral)
        assert image[y - 1:y + 2, x].astype(int)[:, 0].max() - image[y - 1:y + 2, x].astype(int)[:, 1].min() > 60


def test_held_out_combinations_never_train(small_world):
    train_keys = {c.split(", ", 1)[1] for c in small_world.train.captions}
    held = {P.caption(small_world.identities[0], a).split(", ", 1)[1] for a in small_world.held_out}
    assert held and not (train_keys & held)
    assert {c.split(", ", 1)[1] for c in small_world.eval.captions} <= held


def test_every_caption_word_is_one_token(tmp_path):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(world_tokenizer.build_tokenizer(tmp_path / "tok"))
    people = P.make_identities(16)
    for i, attributes in enumerate(P.all_combinations()[::7]):
        text = P.caption(people[i % 16], attributes)
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])[1:-1]
        words = text.replace(",", " ,").split()
        assert len(pieces) == sum(len(w) if w.isdigit() else 1 for w in words), (text, pieces)  # digits split
    assert tokenizer.model_max_length == 32


def test_preferences_follow_the_ideal_and_sides_are_balanced(small_world):
    pairs = small_world.train_pairs
    assert 0.3 < pairs.label_0.mean() < 0.7
    # Replaying the generator's draws independently: the preferred image is the render of higher aesthetic value.
    rng = np.random.default_rng([3, 20])
    people, combos = small_world.identities, world_data.split_combinations(3)[0]
    checked = 0
    while checked < 10:
        identity, attributes, pose = people[rng.integers(len(people))], combos[rng.integers(len(combos))], \
            P.Pose.random(rng)
        (ia, wa), (ib, wb) = rng.uniform(0, 1, (2, 2))
        va, vb = P.aesthetic_value(ia, wa), P.aesthetic_value(ib, wb)
        if abs(va - vb) < world_data.MIN_MARGIN:
            continue
        better = P.render(identity, attributes, pose, size=32, ideal=ia, warmth=wa) if va > vb else \
            P.render(identity, attributes, pose, size=32, ideal=ib, warmth=wb)
        rng.integers(2)  # the generator's draw of the preferred side
        row = pairs.image_0[checked] if pairs.label_0[checked] == 1 else pairs.image_1[checked]
        np.testing.assert_array_equal(row, better)
        checked += 1
