/*
 * khello: the smallest static program, exec'd by kbench's exec and sh benchmarks
 * (lmbench's lat_proc runs its "hello" the same way). Prints nothing: its stdout is
 * the console, which carries kbench's timing markers.
 */
int main(void)
{
    return 0;
}
