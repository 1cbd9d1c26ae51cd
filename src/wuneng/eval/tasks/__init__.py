"""Evaluation task generators and their scorers (numpy/torch only, seeded by explicit ``seed``)."""

from wuneng.eval.tasks.arithmetic import (
    ArithmeticConfig,
    ArithmeticExample,
    ArithmeticTestSet,
    TrainingCorpus,
    generate_examples,
    generate_training_examples,
    make_test_set,
    score_arithmetic,
    training_corpus,
)
from wuneng.eval.tasks.mqar import MQARConfig, MQARData, generate_mqar, mqar_accuracy
from wuneng.eval.tasks.passkey import (
    PasskeyConfig,
    PasskeyExample,
    generate_passkey_examples,
    passkey_match,
    score_passkey,
)
from wuneng.eval.tasks.state_tracking import (
    FiniteGroup,
    StateTrackingConfig,
    StateTrackingData,
    generate_word_problems,
    make_group,
    prefix_products,
    state_tracking_report,
)

__all__ = [
    "ArithmeticConfig",
    "ArithmeticExample",
    "ArithmeticTestSet",
    "TrainingCorpus",
    "generate_examples",
    "generate_training_examples",
    "make_test_set",
    "score_arithmetic",
    "training_corpus",
    "MQARConfig",
    "MQARData",
    "generate_mqar",
    "mqar_accuracy",
    "PasskeyConfig",
    "PasskeyExample",
    "generate_passkey_examples",
    "passkey_match",
    "score_passkey",
    "FiniteGroup",
    "StateTrackingConfig",
    "StateTrackingData",
    "generate_word_problems",
    "make_group",
    "prefix_products",
    "state_tracking_report",
]
