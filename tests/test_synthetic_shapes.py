"""tiny_synthetic.py's pictures and questions: answers agree with the drawn scenes, drawing is deterministic."""

import random

import numpy as np
import pytest

import tiny_synthetic as ss


@pytest.mark.parametrize("kind", ss.KINDS)
def test_answers_agree_with_the_scenes_drawn(kind):
    rng = random.Random(7)
    for _ in range(50):
        sample = ss.make_sample(rng, kind, 56)
        scenes, answer = sample["scenes"], sample["answer"]
        assert sample["question"].count(ss.IMAGE_PLACEHOLDER) == len(sample["images"]) == len(scenes)
        for image, scene in zip(sample["images"], scenes):
            assert np.array_equal(np.asarray(image), np.asarray(ss.draw_scene(scene, 56)))
            assert len({cell for _, _, cell, _, _ in scene}) == len(scene)  # one shape per cell
        if kind == "colour":
            assert answer == scenes[0][0][1]
        elif kind == "shape":
            assert answer == scenes[0][0][0]
        elif kind == "count":
            assert answer == str(len(scenes[0])) and 1 <= len(scenes[0]) <= 4
        elif kind == "relation":
            first, second = sample["question"].split("Is the ")[1].split(" shape left or right of the ")
            column = {colour: cell[0] for _, colour, cell, _, _ in scenes[0]}
            assert answer == ("left" if column[first] < column[second.split(" shape")[0]] else "right")
        else:
            counts = [len(scene) for scene in scenes]
            assert counts[0] != counts[1] and answer == ("first" if counts[0] > counts[1] else "second")


def test_samples_are_deterministic_per_index():
    a, b = ss.sample_at(3, 11, 56), ss.sample_at(3, 11, 56)
    assert a["question"] == b["question"] and a["answer"] == b["answer"]
    assert np.array_equal(np.asarray(a["images"][0]), np.asarray(b["images"][0]))
    assert ss.sample_at(3, 12, 56)["question"] != a["question"]  # consecutive indices cycle through the kinds
