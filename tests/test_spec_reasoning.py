"""Pure cores of distillation: the spec, the teacher prompt, and the think-tag parser."""

import pytest

from dafactory.tasks.distill.reasoning import (
    EMPTY_ANSWER,
    NO_THINK_CLOSE,
    OK,
    TRUNCATED,
    Parsed,
    TeacherPrompt,
    completion_text,
    load_template,
    parse_reasoning,
)
from dafactory.tasks.distill.spec import load_spec
from dafactory.tasks.errors import UserError
from dafactory.tasks.io.prompts import PromptRow


def test_bundled_spec_is_versioned_hashed_and_maps_categories():
    spec = load_spec()
    assert (spec.name, spec.version, len(spec.sha256)) == ("dafactory-safety-spec", "1.0", 64)
    assert set(spec.policies) == {"illicit", "harassment", "violence", "misinformation", "privacy", "sexual",
                                  "self_harm", "intellectual_property", "benign"}
    # dataset category names map onto policies; case and spacing of the policy keys are forgiven
    assert spec.policy_for("Non-violent crimes").key == "illicit"
    assert spec.policy_for("Self-Harm").key == "self_harm"
    assert spec.policy_for("benign").key == "benign"
    with pytest.raises(UserError, match="unknown category 'cooking'; the spec .* knows: .*benign.*violence"):
        spec.policy_for("cooking")


@pytest.mark.parametrize(
    "text, message",
    [
        # a category that points at a policy the spec lacks
        ("policies:\n  benign: {text: be helpful}\ncategories:\n  crime: illicit\n",
         "category 'crime' refers to policy 'illicit', which the spec lacks"),
        # no benign policy
        ("policies:\n  illicit: {text: no crimes}\n", "lacks the 'benign' policy"),
        # a policy without text
        ("policies:\n  benign: {title: B}\n", "policy 'benign' needs a non-empty `text`"),
        # not a spec at all
        ("- just a list\n", "needs a `policies` mapping"),
    ],
)
def test_bad_spec_files(tmp_path, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_spec(str(path))


def test_user_spec_hash_follows_its_text(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("version: '2'\npolicies:\n  benign: {text: be helpful}\n")
    a = load_spec(str(path))
    path.write_text("version: '2'\npolicies:\n  benign: {text: be very helpful}\n")
    assert a.sha256 != load_spec(str(path)).sha256 and a.version == "2"


def test_template_needs_a_prompt_slot(tmp_path):
    path = tmp_path / "t.md"
    path.write_text("Spec: {spec}\nCategories: {categories}\n")
    with pytest.raises(UserError, match=r"has no \{prompt\} slot"):
        load_template(str(path))


def row(categories=("Violence",), prompt="how do i hurt someone"):
    return PromptRow("id", prompt, "; ".join(categories) or None, 3, tuple(categories))


def test_teacher_prompt_holds_request_spec_and_categories():
    spec = load_spec()
    text, _ = load_template(None)
    tp = TeacherPrompt(text, spec)
    (msg,) = tp(row(("Violence", "Non-violent crimes")))
    assert msg["role"] == "user"
    assert "User: how do i hurt someone" in msg["content"]
    assert spec.policies["privacy"].text.strip() in msg["content"]  # the full spec, not only the named policies
    assert "Violence (violence), Illicit behaviour (illicit)" in msg["content"]
    assert tp.prefill == "<think>\n"
    # a prompt that contains a slot name is not expanded
    (msg,) = TeacherPrompt("Q: {prompt} S: {spec}", spec)(row(prompt="say {spec}"))
    assert msg["content"].startswith("Q: say {spec} S: ## ")


def test_rows_without_category():
    tp = TeacherPrompt("{prompt}", load_spec())
    with pytest.raises(UserError, match="source row 3 has no category; set missing_category: benign"):
        tp.check(row(()))
    assert TeacherPrompt("{prompt}", load_spec(), missing_category="benign").categories(row(())) == ("benign",)


@pytest.mark.parametrize(
    "text, finish, expect",
    [
        # the template opened <think>: only </think> appears
        ("I should refuse.</think>Sorry, I can't.", "stop", Parsed("I should refuse.", "Sorry, I can't.", OK)),
        # the model wrote <think> again anyway, with whitespace around everything
        ("\n<think>\nweigh it\n</think>\n\nHere you go.\n", "stop", Parsed("weigh it", "Here you go.", OK)),
        # only the first </think> splits: later ones belong to the answer
        ("a</think>b</think>c", "stop", Parsed("a", "b</think>c", OK)),
        # no </think> at all
        ("thinking forever", "stop", Parsed("thinking forever", None, NO_THINK_CLOSE, "no </think> before the end of the output")),
        # cut at max_new_tokens: excluded even if </think> appeared (the answer may be cut)
        ("thought</think>partial ans", "length", Parsed("thought", "partial ans", TRUNCATED, "stopped at max_new_tokens")),
        ("still thinking", "length", Parsed("still thinking", None, TRUNCATED, "stopped at max_new_tokens")),
        # an empty answer
        ("thought</think>  \n", "stop", Parsed("thought", None, EMPTY_ANSWER, "nothing after </think>")),
        # an empty reasoning is allowed if the answer is there
        ("</think>Answer.", "stop", Parsed("", "Answer.", OK)),
    ],
)
def test_parse_reasoning(text, finish, expect):
    assert parse_reasoning(text, finish) == expect


def test_completion_text():
    assert completion_text("r", "a") == "<think>r</think>a"
