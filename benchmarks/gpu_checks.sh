#!/usr/bin/env bash
# Every GPU measurement and gpu-marked test in one run on a CUDA machine with lookalike and its [gpu] extra
# installed (a leased GPU is paid by the minute: one call, each step under its own time limit). What such a
# machine's image lacks can travel as wheels: benchmarks/device_wheels.sh.
#
#   benchmarks/gpu_checks.sh OUT_DIR [STEPS]     STEPS: comma list of embed,gil,model,tests,scaled,resize,train,host,lock,retry
# (default: all, in that order: the most wanted first)
#
# Writes OUT_DIR/{gpu.txt, gpu_embed.json, gpu_embed.log, timelines.tar, gil.log, model.log, tests.log, failures.log,
# scaled.log, resize.log, train.log, host.log, lock.log, retry.log} (each JSON the scripts write is in their logs too). A leased
# machine hands back at most 8 files: where more were written, the small logs end up in one logs.tar.
# Each step has its own time limit so one slow step cannot eat the others'; a step that fails is logged and the
# next one runs. The default limits add up to 1,355 s; where one command may run 600 s at most (and a lease has
# 15 minutes, its start included), split the steps over two calls, what is owed first:
#   EMBED_ARGS="--paths c,d,resize-kernel,timeline,unpinned,d-again,decoder-life,b,a,e,e-before,e-reads-before,e-missing,switch,hf-tower,so400m,large"
#   EMBED_S=320 TESTS_S=150 RESIZE_S=20 SCALED_S=40 LOCK_S=60 ... embed,tests,resize,scaled,lock
#   (590 s; `large` is cut first, and in `tests` the tower's two and the forked workers' one, listed last), then host (HOST_S=90 EDGES_S=30 MEMO_S=30 SINK_S=25), gil (GIL_S=120), train (TRAIN_S=200), or
#   EMBED_ARGS="--paths mfu,stages" ... embed, on what the lease has left
# (each variant's ratio is against (c) or (d) of the same run). Run E (one H200): `embed` with --paths c,d,backends,
# decode-sms,unpinned,damaged,all-extensions,patch-conv,gelu-separate,resize-channels,b,a,e,e-missing,so400m,large
# ran out of its 395 s in `large`; its 34 `gpu` tests took 110 s; `gil` needs more than 60 s beside busy threads.
# Run D: 451 s of `embed,tests` with --paths c,d,b,a,e,so400m,nomodel,streams,decode-threads,prealloc,freezing,
# timeline,profile; `train` needs 200 s (its compiles); mfu's autotuning compiles take minutes.
set -u
out=${1:?usage: gpu_checks.sh OUT_DIR [STEPS]}
steps=${2:-embed,gil,model,tests,scaled,resize,train,host,lock,retry}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, torchvision, transformers, pyarrow, numpy as np; print('torch', torch.__version__,
 'torchvision', torchvision.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__,
 'numpy', np.__version__)" | tee -a "$out/gpu.txt"
case ",$steps," in *,embed,*)  # the `timeline` path's traces come back as one tar of .json.gz (Perfetto opens them)
  traces=$(mktemp -d)
  timeout "${EMBED_S:-330}" python3 benchmarks/gpu_embed.py --json "$out/gpu_embed.json" --trace-dir "$traces" ${EMBED_ARGS:-} 2>&1 | grep --line-buffered -v '^USDT:' | tee "$out/gpu_embed.log"
  [ -n "$(ls -A "$traces")" ] && tar -cf "$out/timelines.tar" -C "$traces" .
  rm -rf "$traces";;
esac
case ",$steps," in *,gil,*)  # nvImageCodec's two bindings beside threads that want the interpreter lock
  timeout "${GIL_S:-60}" python3 benchmarks/decode_gil.py --device cuda --images 1024 --batch-size 256 2>&1 | tee "$out/gil.log" | tail -8;;
esac
case ",$steps," in *,model,*)  # the model's step beside such threads: eager, compiled, as one CUDA graph
  timeout "${MODEL_S:-90}" python3 benchmarks/model_gil.py --device cuda --compile --batches 8 --rounds 1 2>&1 | tee "$out/model.log" | tail -8;;
esac
case ",$steps," in *,tests,*)
  # each failure's report lands in failures.log as it happens: a step cut off at its limit still says why
  LOOKALIKE_FAILURES_LOG="$out/failures.log" timeout "${TESTS_S:-150}" python3 -m pytest -m gpu -v -p no:cacheprovider -rs tests/encoder/test_gpu_images.py tests/encoder/test_cuda_graph.py tests/encoder/test_devices.py tests/encoder/test_gpu_stream.py tests/encoder/test_nvimgcodec.py tests/encoder/test_page_lock.py tests/encoder/test_sm_share.py tests/encoder/test_resize_kernel.py tests/encoder/test_model.py tests/pipelines/test_embed.py tests/training/test_train_gpu.py tests/encoder/test_siglip_tower.py tests/pipelines/test_worker_fork.py 2>&1 | tee "$out/tests.log" | tail -40;;  # -v: a line per test as it ends, kept if the step runs out of time
esac
case ",$steps," in *,scaled,*)  # nvJPEG's hardware decoder at Pillow's draft scale against full size: worth building in?
  timeout "${SCALED_S:-60}" python3 benchmarks/nvjpeg_scaled.py 2>&1 | grep -v '^USDT:' | tee "$out/scaled.log" | tail -60;;
esac
case ",$steps," in *,resize,*)  # the resize by layout: channel by channel, as the pixels lie, the products alone
  timeout "${RESIZE_S:-25}" python3 benchmarks/resize_layouts.py 2>&1 | tee "$out/resize.log" | tail -10;;
esac
case ",$steps," in *,train,*)
  timeout "${TRAIN_S:-200}" python3 benchmarks/train_bench.py --gpu --seconds 8 2>&1 | tee "$out/train.log" | tail -40;;
esac
case ",$steps," in *,host,*)  # the host's own per-image ceiling (CPU only, decode and model stood in); then a
  # standalone run's start and end on its cores (the first batch read here while the readers start, their reaping)
  timeout "${HOST_S:-150}" python3 benchmarks/worker_overhead.py --images 10000 2>&1 | tail -12 | tee "$out/host.log"
  timeout "${EDGES_S:-40}" python3 benchmarks/run_edges.py --rounds 4 2>&1 | tail -6 | tee -a "$out/host.log"
  # and a local Beam run's fixed cost with what Beam works out again and again remembered (DoFn specs, option views, function arguments), on the CPU
  timeout "${MEMO_S:-40}" python3 benchmarks/beam_memo.py --rounds 3 2>&1 | tail -11 | tee -a "$out/host.log"
  # and the shards placed in one stage against Beam's Write (four stages per sink)
  timeout "${SINK_S:-30}" python3 benchmarks/shard_sink.py --rounds 3 2>&1 | tail -7 | tee -a "$out/host.log";;
esac
case ",$steps," in *,lock,*)  # the serial part on this host: the runner's thread's CPU per image, and the switch interval
  timeout "${LOCK_S:-90}" python3 benchmarks/lock_ceiling.py --images 10000 --rounds 1 --switch-ms 5,0.5 \
    --variants compiled-packed,compiled-packed-before 2>&1 | tail -16 | tee "$out/lock.log";;
esac
case ",$steps," in *,retry,*)  # a failed batch's retry: in halves against image by image padded, SigLIP base compiled;
  # then 32 batches with the GPU's memory taken down to 90% of a batch's, each tried whole first against the backoff
  timeout "${RETRY_S:-90}" python3 benchmarks/retry_cost.py --device cuda --shape base16-224 --compile --rounds 1 2>&1 | tee "$out/retry.log" | tail -3;;
esac
# At most 8 files come back from a leased machine (run E lost tests.log and timelines.tar to that): past 8, the small
# logs travel as one tar, the benchmark's JSON and log, the timelines and the failures as they are.
if [ "$(ls -A "$out" | wc -l)" -gt 8 ]; then
  (cd "$out" && small=$(ls -- *.log gpu.txt 2>/dev/null | grep -vx -e gpu_embed.log -e failures.log) \
    && tar -cf logs.tar $small && rm -f $small)
fi
