#!/usr/bin/env bash
# densenet121-multitask-v1 is the classifier of the multi-task run that also trains the outline
# model densenet121-unet-lesion-v1: the same recipe releases both.
set -euo pipefail
exec "$(dirname "$0")/densenet121-unet-lesion-v1.sh"
