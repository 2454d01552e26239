# exforge sandbox worker: a warm BEAM that compiles and runs candidate programs with
# their ExUnit tests, one at a time, and reports each outcome.
#
# Protocol (a pipe pair passed as two file descriptors, never stdout, so that a candidate writing to the
# real stdout through `:user` cannot forge a frame): every frame is a 4-byte big-endian
# length and a payload. The worker first sends "READY". Each request is one program;
# each reply is one header line "STATUS TESTS FAILURES WARNINGS DIRTY\n" followed by the
# candidate's (truncated) output. DIRTY=1 means the candidate changed global VM state
# that cleaning could not undo for certain; the host then discards this worker.
#
# Arguments: REQUEST_FD REPLY_FD TEST_TIMEOUT_MS MAX_OUTPUT_BYTES WORK_DIR OWN_PID_NAMESPACE
# PRELUDE (OWN_PID_NAMESPACE=1: every OS process in /proc is this VM's, so the ones a
# candidate leaves running count as changed state. PRELUDE: base64 of Elixir compiled once
# before the baseline, maybe empty.)

defmodule Exforge.Sandbox.Sink do
  @moduledoc "An IO device that keeps the first `limit` bytes written to it."

  def start(limit), do: spawn(fn -> loop(limit, []) end)

  def contents(sink) do
    ref = make_ref()
    send(sink, {:contents, self(), ref})

    receive do
      {^ref, data} -> data
    after
      1000 -> ""
    end
  end

  defp loop(room, acc) do
    receive do
      {:io_request, from, reply_as, request} ->
        {reply, room, acc} = handle(request, room, acc)
        send(from, {:io_reply, reply_as, reply})
        loop(room, acc)

      {:contents, from, ref} ->
        send(from, {ref, IO.iodata_to_binary(Enum.reverse(acc))})
        loop(room, acc)

      _other ->
        loop(room, acc)
    end
  end

  defp handle({:put_chars, _encoding, chars}, room, acc), do: keep(chars, room, acc)

  defp handle({:put_chars, _encoding, m, f, a}, room, acc),
    do: keep(apply(m, f, a), room, acc)

  defp handle({:put_chars, chars}, room, acc), do: keep(chars, room, acc)
  defp handle({:requests, requests}, room, acc), do: handle_all(requests, room, acc)
  defp handle({:get_geometry, _}, room, acc), do: {{:error, :enotsup}, room, acc}
  defp handle({:setopts, _}, room, acc), do: {:ok, room, acc}
  defp handle(:getopts, room, acc), do: {[binary: true, encoding: :unicode], room, acc}
  defp handle(_request, room, acc), do: {:eof, room, acc}

  defp handle_all([], room, acc), do: {:ok, room, acc}

  defp handle_all([request | rest], room, acc) do
    {_reply, room, acc} = handle(request, room, acc)
    handle_all(rest, room, acc)
  end

  defp keep(_chars, room, acc) when room <= 0, do: {:ok, room, acc}

  defp keep(chars, room, acc) do
    data = IO.chardata_to_string(chars)
    taken = binary_part(data, 0, min(byte_size(data), room))
    {:ok, room - byte_size(taken), [taken | acc]}
  end
end

defmodule Exforge.Sandbox.Collector do
  @moduledoc "ExUnit formatter that sends each finished test to the candidate's runner."
  use GenServer

  def init(opts), do: {:ok, Keyword.fetch!(opts, :exforge_reply_to)}

  def handle_cast({:test_finished, test}, reply_to) do
    send(reply_to, {:exforge_test, classify(test.state)})
    {:noreply, reply_to}
  end

  def handle_cast(_event, reply_to), do: {:noreply, reply_to}

  defp classify(nil), do: :passed
  defp classify({:skipped, _}), do: :skipped
  defp classify({:excluded, _}), do: :skipped
  defp classify({:invalid, _}), do: :runtime_error
  defp classify({:failed, failures}), do: failures |> Enum.map(&failure_kind/1) |> worst()

  defp failure_kind({:error, %ExUnit.AssertionError{}, _}), do: :failed
  defp failure_kind({:error, %ExUnit.TimeoutError{}, _}), do: :timeout
  defp failure_kind(_other), do: :runtime_error

  defp worst(kinds) do
    Enum.find([:timeout, :runtime_error, :failed], :failed, &(&1 in kinds))
  end
end

defmodule Exforge.Sandbox.Server do
  @syntax_errors [SyntaxError, TokenMissingError, CompileError]
  @warm_up """
  defmodule WarmUpTest do
    use ExUnit.Case, async: true
    test "warm up", do: assert(Enum.sum([1]) == 1)
  end
  """

  def main([request_fd, reply_fd, timeout_ms, max_output, work_dir, own_pid_namespace, prelude]) do
    config = %{
      timeout_ms: String.to_integer(timeout_ms),
      max_output: String.to_integer(max_output),
      work_dir: work_dir,
      own_pid_namespace: own_pid_namespace == "1"
    }

    ExUnit.start(autorun: false)
    Code.compile_string(Base.decode64!(prelude), "prelude.ex")
    fds = {:fd, String.to_integer(request_fd), String.to_integer(reply_fd)}
    # :eof: the host closing its end (it exited, even by SIGKILL) ends this VM too.
    port = Port.open(fds, [:binary, {:packet, 4}, :eof])
    # Warm up the compiler and ExUnit so that their lazily started state is part of
    # the baseline every later candidate is compared with.
    run_candidate(@warm_up, 0, config, snapshot(config))
    # The baseline every candidate is compared with: a clean candidate leaves the VM as
    # it found it, so this is also the state before each candidate; taken once, it also
    # catches what changes between candidates.
    baseline = snapshot(config)
    Port.command(port, "READY")
    serve(port, config, baseline, 1)
  end

  defp serve(port, config, baseline, counter) do
    receive do
      {^port, {:data, program}} ->
        Port.command(port, run_candidate(program, counter, config, baseline))
        serve(port, config, baseline, counter + 1)

      {^port, :eof} ->
        System.halt(0)
    end
  end

  defp run_candidate(program, counter, config, before) do
    dir = Path.join(config.work_dir, "candidate-#{counter}")
    File.mkdir_p!(dir)
    File.cd!(dir)
    out = Exforge.Sandbox.Sink.start(config.max_output)
    err = Exforge.Sandbox.Sink.start(config.max_output)
    standard_error = Process.whereis(:standard_error)
    swap_registered(:standard_error, err)

    ExUnit.configure(
      formatters: [ExUnit.CLIFormatter, Exforge.Sandbox.Collector],
      colors: [enabled: false],
      exforge_reply_to: self(),
      timeout: max(config.timeout_ms, 1),
      exclude: [],
      include: [],
      max_failures: :infinity,
      autorun: false
    )

    {pid, ref} = spawn_monitor(fn -> compile_and_test(program, out) end)
    {status, detail} = await(pid, ref)
    tests = collect_tests([])
    swap_registered(:standard_error, standard_error)
    File.cd!(config.work_dir)
    File.rm_rf(dir)
    warnings = err |> Exforge.Sandbox.Sink.contents() |> count_warnings()
    output = Exforge.Sandbox.Sink.contents(out) <> detail
    leftover = clean_up(before, [out, err])
    dirty = leftover or snapshot(config, before) != before
    status = overall(status, tests)
    failures = Enum.count(tests, &(&1 != :passed and &1 != :skipped))

    header =
      Enum.join([status, length(tests), failures, warnings, if(dirty, do: 1, else: 0)], " ")

    [header, "\n", binary_part(output, 0, min(byte_size(output), config.max_output))]
  end

  defp compile_and_test(program, out) do
    Process.group_leader(self(), out)

    result =
      try do
        Code.compile_string(program, "candidate.exs")
        ExUnit.Server.modules_loaded()
        ExUnit.run()
        {:ran, ""}
      rescue
        error in @syntax_errors -> {:syntax_error, Exception.message(error)}
        error -> {:runtime_error, Exception.format(:error, error, __STACKTRACE__)}
      catch
        kind, reason -> {:runtime_error, Exception.format(kind, reason, __STACKTRACE__)}
      end

    exit({:exforge_result, result})
  end

  defp await(pid, ref) do
    receive do
      {:DOWN, ^ref, :process, ^pid, {:exforge_result, result}} -> result
      {:DOWN, ^ref, :process, ^pid, reason} -> {:runtime_error, inspect(reason)}
    end
  end

  defp collect_tests(acc) do
    receive do
      {:exforge_test, kind} -> collect_tests([kind | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  # Passing needs at least one test that ran and passed, and no test that did not.
  defp overall(:ran, tests) do
    cond do
      kind = Enum.find([:timeout, :runtime_error, :failed], &(&1 in tests)) -> kind
      :passed in tests -> :passed
      true -> :failed
    end
  end

  defp overall(status, _tests), do: status

  defp count_warnings(text), do: length(Regex.scan(~r/^warning: /m, text))

  defp swap_registered(name, pid) do
    if Process.whereis(name), do: Process.unregister(name)
    Process.register(pid, name)
  end

  # Kill every process the candidate left behind, unload every module it defined and
  # drop test modules that never ran. True if anything had been left running.
  defp clean_up(before, sinks) do
    Enum.each(sinks, &Process.exit(&1, :kill))
    strays = Process.list() -- [self() | before.processes ++ sinks]
    Enum.each(strays, &Process.exit(&1, :kill))
    # the candidate's: compiled from a string, or left with old code only
    for module <- :erlang.loaded(),
        not Map.has_key?(before.modules, module),
        :code.is_loaded(module) in [{:file, []}, false],
        do: unload(module)

    drain_test_modules()
    await_exit(strays)
    strays != []
  end

  defp drain_test_modules do
    ExUnit.Server.modules_loaded()
    drain_async_modules()
    ExUnit.Server.take_sync_modules()
  end

  defp drain_async_modules do
    if ExUnit.Server.take_async_modules(1_000), do: drain_async_modules()
  end

  defp await_exit(pids) do
    Enum.each(pids, fn pid ->
      ref = Process.monitor(pid)

      receive do
        {:DOWN, ^ref, :process, ^pid, _} -> :ok
      end
    end)
  end

  defp unload(module) do
    :code.purge(module)
    :code.delete(module)
    :code.purge(module)
  end

  # Loaded modules with their checksums (a module redefined, from a string or a file, is
  # changed state): with `baseline` nil, every one; else those of the baseline and those
  # loaded since but for the ones from an object file in the code path (Erlang's and
  # Elixir's own, loaded on first use): a module compiled from a string or loaded from
  # anywhere else counts. ~25 µs for ~250 modules where `:code.all_loaded/0` takes ~0.8 ms.
  defp modules(baseline, code_path) do
    for module <- :erlang.loaded(),
        baseline == nil or Map.has_key?(baseline, module) or not autoloaded?(module, code_path),
        into: %{},
        do: {module, checksum(module)}
  end

  # Loaded from an object file in an absolute directory of the code path (not ".").
  defp autoloaded?(module, code_path) do
    case :code.is_loaded(module) do
      {:file, [_ | _] = path} ->
        directory = path |> Path.dirname() |> String.to_charlist()
        Path.type(directory) == :absolute and directory in code_path

      _ ->
        false
    end
  end

  # :erlang.get_module_info/2 (not module_info/1, which would load a deleted module
  # again); a module with only old code left has none.
  defp checksum(module) do
    :erlang.get_module_info(module, :md5)
  rescue
    ArgumentError -> :old_code_only
  end

  # a table deleted meanwhile has none
  defp ets_contents(table) do
    table |> :ets.tab2list() |> Enum.sort()
  rescue
    ArgumentError -> :deleted
  end

  # OS processes of this VM's PID namespace (none tracked without one of its own).
  defp os_processes(%{own_pid_namespace: false}), do: []

  defp os_processes(%{own_pid_namespace: true}) do
    "/proc" |> File.ls!() |> Enum.filter(&(&1 =~ ~r/^[0-9]+$/)) |> Enum.sort()
  end

  # Global state a candidate could change to influence a later one; `baseline`: the
  # snapshot modules loaded since are judged against (nil for the baseline itself).
  defp snapshot(config, baseline \\ nil) do
    code_path = :code.get_path()

    %{
      os_processes: os_processes(config),
      home: config.work_dir |> File.ls!() |> Enum.sort(),
      processes: Process.list() |> Enum.sort(),
      modules: modules(baseline && baseline.modules, code_path),
      registered: Process.registered() |> Enum.sort(),
      ports: Port.list() |> Enum.sort(),
      ets: :ets.all() |> Enum.sort(),
      # what any process may write: the public tables' contents (~7 small ones, ~50 µs)
      public_ets:
        for(t <- :ets.all(), :ets.info(t, :protection) == :public, do: {t, ets_contents(t)}),
      os_env: System.get_env(),
      persistent_terms: :persistent_term.info().count,
      env:
        Enum.sort(
          for {app, _, _} <- Application.loaded_applications(),
              do: {app, Application.get_all_env(app)}
        ),
      cwd: File.cwd!(),
      code_path: code_path,
      compiler: Code.compiler_options()
    }
  end
end

Exforge.Sandbox.Server.main(System.argv())
