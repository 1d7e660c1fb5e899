# MambaClinix bundle: set-up, demo and tests. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# OpenMP threads sleep while they wait instead of spinning: far less CPU time per call when other jobs share the
# cores, about 5% more time alone (docs/benchmarks/contention/). A value set by the user is kept;
# OMP_WAIT_POLICY=default leaves the variable out (the OpenMP runtime's own default: spin, then sleep)
OMP_WAIT_POLICY ?= PASSIVE
ifeq ($(OMP_WAIT_POLICY),default)
unexport OMP_WAIT_POLICY
else
export OMP_WAIT_POLICY
endif
BUNDLE_ARGS := --meta_file configs/metadata.json --bundle_root . --logging_file configs/logging.conf
TRAIN_CONFIGS := "['configs/train.yaml','configs/plan.yaml']"
# CPU-sized demo: 2 mm grid, features up to 128, a few minutes of training on 2 cores
DEMO_EPOCHS ?= 12
DEMO_ITERS ?= 12
DEMO_VAL ?= 4

# lesion workflow (Mamba-HUNet, 2D) on synthetic FLAIR lesions: a CPU-sized network trained on 64 x 64 crops
LESION_DIR ?= data/lesions
LESION_TRAIN ?= 12
LESION_TEST ?= 6
LESION_EPOCHS ?= 70
HUNET_BUNDLE_ARGS := --meta_file configs/hunet_metadata.json --bundle_root . --logging_file configs/logging.conf
HUNET_DEMO_ARGS := --img_size 192 --embed_dims "[16,32,64,128]" --depths "[1,1,1,1]" --d_state 8 --train_patch 64
HUNET_EVAL := $(PY) -m monai.bundle run evaluating --config_file "['configs/hunet_train.yaml','configs/hunet_evaluate.yaml']" \
	$(HUNET_BUNDLE_ARGS) $(HUNET_DEMO_ARGS)

.PHONY: setup data plan train evaluate inference demo test test-cuda-paths clean-demo label-server test-label \
	lesion-data lesion-model demo-lesions

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip==26.3" || $(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) -m scripts.demo.data --output data --which mni pyradiomics

plan: data
	$(PY) -m scripts.plan --datalist data/mni/datalist.json --dataset_dir data/mni --output configs/plan.yaml \
		--cpu --base_features 16 --max_features 128 --target_spacing 2 2 2

train: plan
	$(PY) -m monai.bundle run training --config_file $(TRAIN_CONFIGS) $(BUNDLE_ARGS) \
		--epochs $(DEMO_EPOCHS) --iterations_per_epoch $(DEMO_ITERS) --val_interval $(DEMO_VAL) --drop_path_rate 0.1

evaluate:
	$(PY) -m monai.bundle run evaluating --config_file "['configs/train.yaml','configs/plan.yaml','configs/evaluate.yaml']" \
		$(BUNDLE_ARGS) --summary_file eval/demo_metrics.json

inference:
	$(PY) -m monai.bundle run inference --config_file "['configs/inference.yaml','configs/plan.yaml']" $(BUNDLE_ARGS)

demo: setup
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory data plan train evaluate inference && \
	$(PY) -c "import json; m = json.load(open('eval/demo_metrics.json')); r = lambda d: {k: v if v is None else round(v, 4) for k, v in d.items()}; \
	print('held-out Dice per class:', r(m['dice']['per_class'])); \
	print('held-out HD95 per class (%s):' % m['hd95_unit'], r(m['hd95']['per_class'])); \
	print('held-out mean Dice: %.4f (per class over the cases, then the mean over the classes)' % m['mean_dice'])" && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s; metrics in eval/demo_metrics.json, segmentation and overlay in eval/inference/"

lesion-data: setup
	test -f data/mni/raw/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz || $(PY) -m scripts.demo.data --output data --which mni
	$(PY) -m scripts.lesions.generate --mni_dir data/mni/raw --output $(LESION_DIR) --train $(LESION_TRAIN) --val 1 \
		--test $(LESION_TEST) --seed 0

# models/hunet_model.pt (with its configuration recorded), which python -m scripts.hunet.service serves
lesion-model: lesion-data
	$(PY) -m monai.bundle run training --config_file configs/hunet_train.yaml $(HUNET_BUNDLE_ARGS) $(HUNET_DEMO_ARGS) \
		--dataset_dir $(LESION_DIR) --datalist $(LESION_DIR)/datalist.json --epochs $(LESION_EPOCHS) \
		--val_interval $(LESION_EPOCHS) --batch_size 8 --pos_ratio 3 --learning_rate 0.002

demo-lesions: setup
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory lesion-model && \
	$(PY) -m scripts.demo.data --output data --which pyradiomics && \
	$(HUNET_EVAL) --dataset_dir $(LESION_DIR) --datalist $(LESION_DIR)/datalist.json --eval_split test \
		--output_dir eval/lesions/synthetic && \
	$(HUNET_EVAL) --dataset_dir data/pyradiomics --datalist data/pyradiomics/datalist_brain.json --eval_split all \
		--output_dir eval/lesions/real && \
	$(PY) -m scripts.demo.lesions --set "synthetic test=eval/lesions/synthetic/metrics.json" \
		--set "real MRI (pyradiomics brain1, brain2)=eval/lesions/real/metrics.json" --datalist $(LESION_DIR)/datalist.json \
		--output eval/lesions && \
	echo "demo-lesions wall time: $$(( $$(date +%s) - start )) s; summary in eval/lesions/summary.md; serve the model with" \
		"python -m scripts.hunet.service (http://127.0.0.1:8008/)"

test: setup
	test -f data/mni/raw/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz || $(PY) -m scripts.demo.data --output data --which mni
	$(PY) -m pytest -q -p no:cacheprovider --timeout 900 tests

# the CUDA code paths on CPU: mamba-ssm / causal-conv1d built without kernels in .venv-cuda-ref, their reference
# functions substituted for the kernels (tests/cuda_reference.py)
test-cuda-paths:
	bash scripts/checks/setup_cuda_ref_env.sh
	.venv-cuda-ref/bin/python -m pytest -q -p no:cacheprovider --timeout 900 -W ignore::DeprecationWarning tests/test_cuda_paths.py

clean-demo:
	rm -rf models/*.pt runs eval configs/plan.yaml $(LESION_DIR)

# MONAI Label 0.8.5 backend (its own virtual environment .venv-label: torch 2.14.1 + torchvision, see docs/monailabel.md)
label-server: setup
	OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) bash scripts/label/run_server.sh

test-label: setup
	bash scripts/label/setup_env.sh
	test -f data/mni/images/mni_left.nii.gz || $(PY) -m scripts.demo.data --output data --which mni
	MAMBACLINIX_LABEL_RESULTS=eval/monailabel_test.json $(PY) -m pytest -q -s -p no:warnings -p no:cacheprovider \
		tests/test_monailabel.py tests/test_label_compat.py tests/test_label_guard.py
