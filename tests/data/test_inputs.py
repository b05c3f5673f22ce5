import pytest

from bus_core.data.inputs import InputSpec, describe_input

WHOLE = "This model looks at the whole image; a lesion mask is optional."
WHOLE_MASKED = "This model looks at the whole image; the mask is for reference only."
CROP = "This model looks only at the masked lesion crop."
CROP_AUTO = "This model looks only at the masked lesion crop (outlined automatically)."
CONTEXT = ("This model looks at the lesion and the tissue around it: the box around the "
           "outline.")
CONTEXT_AUTO = ("This model looks at the lesion and the tissue around it: the box around the "
                "outline (outlined automatically).")
TWO_STAGE = ("Two-stage reading: the whole image tells normal from lesion; the lesion and the "
             "tissue around it (the box around the outline) tell benign from malignant.")
TWO_STAGE_AUTO = ("Two-stage reading: the whole image tells normal from lesion; the lesion and "
                  "the tissue around it (the box around the outline, outlined automatically) "
                  "tell benign from malignant.")
TWO_STAGE_WHOLE = ("No lesion outline, so the whole-image model reads the whole image. Accept "
                   "the suggested outline or paint one to read the lesion itself.")


@pytest.mark.parametrize("mode, two_stage, has_mask, automatic, sentence", [
    ("full", False, False, False, WHOLE),
    ("full", False, True, False, WHOLE_MASKED),
    ("full", False, True, True, WHOLE_MASKED),
    ("mask", False, True, False, CROP),
    ("mask-leakfree", False, True, True, CROP_AUTO),
    ("mask", False, False, False, CROP),
    ("lesion-context", False, True, False, CONTEXT),
    ("lesion-context", False, True, True, CONTEXT_AUTO),
    ("lesion-context", True, True, False, TWO_STAGE),
    ("lesion-context", True, True, True, TWO_STAGE_AUTO),
    ("lesion-context", True, False, False, TWO_STAGE_WHOLE),
])
def test_describe_input_says_what_the_model_looks_at(mode, two_stage, has_mask, automatic,
                                                     sentence):
    assert describe_input(InputSpec.of(mode), two_stage=two_stage, has_mask=has_mask,
                          outlined_automatically=automatic) == sentence
